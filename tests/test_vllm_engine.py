"""fastprompt's adapters inside vLLM's offline engine (``vllm.LLM``), against fastprompt's patched ``generate``:

- every adapter kind (prefix tuning with and without projection, P-tuning v2, P-tuning MLP and LSTM, prompt
  tuning), a cached prompt and an exported prefix file, with prefix lengths below, equal to and above vLLM's cache
  block (32) and not multiples of it, mixed with plain requests in one batch: greedy tokens equal, log-probabilities
  within 1e-4;
- two adapters of equal length never share cache blocks;
- an adapter's prefix is written once and then read from vLLM's prefix cache;
- an unknown adapter, an adapter of another model, a prompt past ``max_model_len`` and prompt logprobs under an
  adapter are refused by name.

Runs in vLLM's own environment (``.ci/vllm-env DIR``, then ``DIR/bin/pytest -m vllm``); skipped elsewhere.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; build its environment with .ci/vllm-env DIR and "
                    "run DIR/bin/pytest -m vllm")

# In-process engine core: starts in seconds, and a test can read the scheduler-side connector.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402
from vllm_cases import (  # noqa: E402
    BLOCK,
    MAX_MODEL_LEN,
    AdapterCase,
    Reference,
    assert_equal_reference,
    build_setup,
    close,
    engine,
    generate,
    random_prompts,
    save_adapters,
    scheduler_connector,
)

from fastprompt.engines.vllm import BASE, PromptAdapters  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def reference(setup):
    return Reference(*setup)


@pytest.fixture(scope="module")
def adapters(setup):
    model_dir, sources, prompts = setup
    return PromptAdapters(model_dir, sources, prompts=prompts)


@pytest.fixture(scope="module")
def llm(adapters):
    started = engine(adapters)
    yield started
    close(started)


def test_every_adapter_kind_mixed_with_plain_requests_equals_fastprompt_generate(llm, adapters, reference):
    names = ["proj", BASE, "deep", "mlp", "lstm", "soft", "fewshot", "exported", BASE, "lstm", "proj", "soft"]
    rows = list(zip(names, random_prompts(len(names), 3, 24, seed=1), strict=True))
    assert {adapters.prefix_length(n) for n in names} >= {10, 32, 45, 70}
    assert_equal_reference(generate(llm, adapters, rows), rows, reference)


def test_adapters_of_equal_length_never_share_cache_blocks(llm, adapters, reference):
    """The same prompts under "deep", then under "twin" (both 45 positions, equal placeholder ids): without a salt
    per adapter the second batch would find "deep"'s first block in vLLM's prefix cache and read its K/V."""
    assert adapters.prefix_length("deep") == adapters.prefix_length("twin")
    prompts = random_prompts(3, 4, 12, seed=2)
    connector = scheduler_connector(llm)
    for name in ("deep", "twin"):
        rows = [(name, prompt) for prompt in prompts]
        assert_equal_reference(generate(llm, adapters, rows), rows, reference)
    assert connector.written["twin"] >= 45, "twin's prefix was never written: it read another adapter's blocks"


def test_a_prefix_is_written_once_then_read_from_the_prefix_cache(llm, adapters, reference):
    """Requests of "lstm" (70 positions: two full placeholder-only blocks) one after another, each a new prompt: the
    first 64 positions come from vLLM's prefix cache after the first request, so each writes only the last 6."""
    connector = scheduler_connector(llm)
    rows = [("lstm", prompt) for prompt in random_prompts(3, 4, 12, seed=3)]
    answers = generate(llm, adapters, rows[:1])
    for row in rows[1:]:
        before = connector.written["lstm"]
        answers += generate(llm, adapters, [row])
        assert connector.written["lstm"] - before == 70 - 2 * BLOCK
    assert_equal_reference(answers, rows, reference)


def test_unknown_adapter_is_refused_by_name(adapters):
    with pytest.raises(KeyError, match="'nope'.*serves"):
        adapters.request("nope", [5, 6, 7])


def test_prompt_past_max_model_len_is_refused_naming_both_parts(adapters, llm):
    """Against the limit given here, or by default the one the engine was started with."""
    for limit in (MAX_MODEL_LEN, None):
        with pytest.raises(ValueError, match=r"200 tokens and adapter 'lstm' takes 70 positions: 270 > max_model_len"):
            adapters.request("lstm", [5] * 200, max_model_len=limit)


def test_prompt_logprobs_under_an_adapter_are_refused(adapters):
    with pytest.raises(ValueError, match="prompt logprobs"):
        adapters.request("proj", [5, 6], vllm.SamplingParams(prompt_logprobs=1))


def test_adapter_of_another_model_is_refused_when_compiled(setup, tmp_path):
    other = save_adapters(tmp_path, {"wide": AdapterCase("prefix", 5)}, layers=3)
    with pytest.raises(ValueError, match="'wide'.*layers"):
        PromptAdapters(setup[0], other)
