"""``fastprompt serve`` over HTTP on 127.0.0.1 with the official ``openai`` client, against vLLM's offline engine
(whose answers test_vllm_engine.py holds to fastprompt's ``generate``) with the same adapters:

- ``/v1/models`` lists every adapter; ``model=NAME`` selects it on ``/v1/completions`` and
  ``/v1/chat/completions`` (the chat template applied, then the adapter's prefix in front), streaming included,
  and the response names the adapter;
- an unknown adapter is a 404 naming it; a prompt past ``max_model_len`` a 400 naming both parts; prompt
  log-probabilities and beam search under an adapter 400s saying so; the server keeps serving after them;
- 64 concurrent requests over 8 adapters of every kind (a cached prompt and an exported file among them): every
  answer equals the offline one.

Runs in vLLM's own environment (``.ci/vllm-env DIR``, then ``DIR/bin/pytest -m vllm``); skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; build its environment with .ci/vllm-env DIR and "
                    "run DIR/bin/pytest -m vllm")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (vLLM installs it)")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_cases import (  # noqa: E402
    BLOCK,
    MAX_MODEL_LEN,
    Reference,
    build_setup,
    close,
    engine,
    random_prompts,
    save_tokenizer,
    words,
)

import fastprompt  # noqa: E402
from fastprompt.engines.vllm import BASE, PromptAdapters  # noqa: E402

pytestmark = pytest.mark.vllm

NEW_TOKENS = 6
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The model folder (with a tokenizer) and 8 adapters as the server takes them, paths: the PEFT folders of every
    kind, an exported prefix file and the cached few-shot prompt exported to a file."""
    root = tmp_path_factory.mktemp("server")
    model_dir, adapters, prompts = build_setup(root)
    save_tokenizer(model_dir)
    exporter = Reference(model_dir, {}, prompts)
    adapters["fewshot"] = str(root / "fewshot.safetensors")
    fastprompt.export_prefix_kv(exporter.model, "fewshot").save(adapters["fewshot"])
    return model_dir, adapters


def _chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def cases(sources) -> list[tuple[str, str, str]]:
    """64 requests ``(endpoint, adapter, text)`` over the 8 adapters and the base model, completions and chats."""
    names = sorted(sources[1])
    texts = [words(p) for p in random_prompts(64, 3, 16, seed=5)]
    return [("chat" if i % 4 == 3 else "completion", names[i % len(names)] if i % 9 else BASE, text)
            for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def offline(sources, cases) -> dict[tuple[str, str, str], tuple[str, list[float]]]:
    """Each case's (text, log-probabilities) from the offline engine, the chat template applied here."""
    import vllm
    from transformers import AutoTokenizer

    model_dir, paths = sources
    adapters = PromptAdapters(model_dir, paths)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = engine(adapters, skip_tokenizer_init=False)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    try:
        requests = []
        for endpoint, name, text in cases:
            prompt = text if endpoint == "completion" else tokenizer.apply_chat_template(
                _chat(text), add_generation_prompt=True, tokenize=True)["input_ids"]
            requests.append(adapters.request(name, prompt, params, MAX_MODEL_LEN))
        outputs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    finally:
        close(llm)
    answers = {}
    for case, output in zip(cases, outputs, strict=True):
        completion = output.outputs[0]
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)]
        answers[case] = (completion.text, logprobs)
    return answers


@pytest.fixture(scope="module")
def server(sources, offline, tmp_path_factory):
    """``fastprompt serve`` in its own process (after the offline engine closed), the base URL while it runs."""
    model_dir, paths = sources
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    command = [
        sys.executable, "-m", "fastprompt", "serve", str(model_dir),
        *[arg for name, path in paths.items() for arg in ("--adapter", f"{name}={path}")],
        "--host", "127.0.0.1", "--port", str(port), "--block-size", str(BLOCK),
        "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "base",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # not the repository root as working directory: its kernels/ folder would shadow the kernels package that
    # transformers imports
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    url = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=url, api_key="none", timeout=5)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"fastprompt serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)


_PARAMS = {"max_tokens": NEW_TOKENS, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


async def _ask(client: openai.AsyncOpenAI, endpoint: str, name: str, text: str) -> tuple[str, str, list[float]]:
    """(model named in the response, text, log-probabilities) of one request."""
    model = "base" if name == BASE else name
    if endpoint == "completion":
        r = await client.completions.create(model=model, prompt=text, logprobs=0, **_PARAMS)
        return r.model, r.choices[0].text, r.choices[0].logprobs.token_logprobs
    r = await client.chat.completions.create(model=model, messages=_chat(text), logprobs=True, **_PARAMS)
    return r.model, r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]


def _assert_equal_offline(case, answer, offline) -> None:
    (endpoint, name, _), (model, text, logprobs) = case, answer
    want_text, want_logprobs = offline[case]
    assert model == ("base" if name == BASE else name)
    assert text == want_text, f"{endpoint} under {name}: server {text!r} != offline {want_text!r}"
    err = max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True))
    assert err <= 1e-4, f"{endpoint} under {name}: log-probabilities differ by {err:.2e}"


def test_models_lists_every_adapter(server, sources):
    listed = {m.id for m in _client(server).models.list()}
    assert listed == {"base", *sources[1]}


def test_each_adapter_on_both_endpoints_equals_offline(server, cases, offline):
    async def run():
        client = openai.AsyncOpenAI(base_url=server, api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        return [await _ask(client, *case) for case in cases[:18]]

    for case, answer in zip(cases[:18], asyncio.run(run()), strict=True):
        _assert_equal_offline(case, answer, offline)


def test_streaming_equals_offline(server, cases, offline):
    client = _client(server)
    for endpoint, name, text in [c for c in cases if c[1] != BASE][:4]:
        if endpoint == "completion":
            stream = client.completions.create(model=name, prompt=text, stream=True, **_PARAMS)
            streamed = "".join(chunk.choices[0].text for chunk in stream)
        else:
            stream = client.chat.completions.create(model=name, messages=_chat(text), stream=True, **_PARAMS)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == offline[(endpoint, name, text)][0], f"streamed {endpoint} under {name}"


def test_bad_requests_are_refused_by_name_and_the_server_keeps_serving(server, cases, offline):
    client = _client(server)
    with pytest.raises(openai.NotFoundError, match="`nope` does not exist"):
        client.completions.create(model="nope", prompt="w5 w6", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"adapter 'lstm' takes 70 positions: .* > max_model_len 256"):
        client.completions.create(model="lstm", prompt=words([5] * 200), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt logprobs are not available under adapter 'deep'"):
        client.completions.create(model="deep", prompt="w5 w6", max_tokens=2, extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="beam search is not available under adapter 'deep'"):
        client.completions.create(model="deep", prompt="w5 w6", max_tokens=2, n=2,
                                  extra_body={"use_beam_search": True})
    case = next(c for c in cases if c[0] == "completion" and c[1] != BASE)
    _assert_equal_offline(case, asyncio.run(_ask(openai.AsyncOpenAI(base_url=server, api_key="none"), *case)), offline)


def test_64_concurrent_requests_over_8_adapters_equal_offline(server, cases, offline):
    assert len(cases) == 64 and len({name for _, name, _ in cases} - {BASE}) == 8

    async def run():
        client = openai.AsyncOpenAI(base_url=server, api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        return await asyncio.gather(*(_ask(client, *case) for case in cases))

    started = time.monotonic()
    answers = asyncio.run(run())
    print(f"64 concurrent requests: {time.monotonic() - started:.1f} s")
    for case, answer in zip(cases, answers, strict=True):
        _assert_equal_offline(case, answer, offline)
