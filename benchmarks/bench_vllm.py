"""Throughput of prompt-learning adapters served inside vLLM (CPU build), against the ways without it.

Usage (in vLLM's environment, ``.ci/vllm-env DIR``)::

    DIR/bin/python benchmarks/bench_vllm.py [--rounds N] [--out PATH]

One workload, the same prompts on every side: a random-weight Llama (hidden 256, 4 layers, 8 query / 2 key-value
heads, float32), 16 prefix-tuning adapters of 32 virtual tokens (P-tuning v2 form), 64 requests of 48-80 tokens
spread over them, 32 greedy new tokens each. Sides:

- vllm-adapters: vLLM with the adapters (``fastprompt.engines.vllm``), all 64 requests in one ``generate``;
- vllm-plain: vLLM without the connector on the same prompts, no adapter (the ceiling);
- fastprompt-generate: fastprompt's patched transformers model, one batch with ``adapter_names``;
- peft-loop: PEFT, one batch per adapter (``set_adapter`` then ``generate``);
- a 256-token few-shot prompt in front of each request: served as a named prefix (``fastprompt.cache_prompt``,
  through the connector) against vLLM's own prefix caching of the same tokens written in front.

Each vLLM side runs after a warm-up batch of other prompts (so an adapter's prefix, or the few-shot tokens, are in
vLLM's prefix cache, as in steady serving); each round uses new prompts, the same on every side, and the sides of one
engine take turns within each round; the best round of each side is kept (the machine is shared). The vLLM sides
run ``--rounds`` rounds, fastprompt's generate and PEFT's loop ``--hf-rounds`` (PEFT's takes minutes). Tokens are
checked before any time is reported: vLLM with the adapters must give fastprompt's greedy tokens, and the named
few-shot prefix vLLM's tokens with the text in front. Engine start is timed with and without the 16 adapters
(compiling them included). Prints a markdown table headed by device, date, versions, commit and the command;
``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# before torch: vLLM otherwise drops this process to one thread, and every side should have the same threads
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

ADAPTERS = 16
PREFIX_LEN = 32
REQUESTS = 64
PROMPT_LENS = (48, 80)
NEW_TOKENS = 32
FEWSHOT_LEN = 256
VOCAB = 32000
BLOCK = 32
MAX_MODEL_LEN = 512


def build(root: Path) -> tuple[Path, dict[str, str]]:
    """The random Llama and the 16 PEFT adapters, saved under ``root``."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=MAX_MODEL_LEN,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    adapters = {}
    for i in range(ADAPTERS):
        torch.manual_seed(100 + i)  # only the adapter is saved; its base is a throwaway of the same shape
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config),
                                    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN))
        adapters[f"a{i}"] = str(root / f"a{i}")
        peft_model.save_pretrained(adapters[f"a{i}"])
    return root / "model", adapters


def prompts(seed: int) -> list[tuple[str, list[int]]]:
    """64 (adapter, token ids) requests, adapters in turn, lengths uniform in PROMPT_LENS."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT_LENS[0], PROMPT_LENS[1] + 1, (REQUESTS,), generator=gen).tolist()
    return [(f"a{i % ADAPTERS}", torch.randint(3, VOCAB, (n,), generator=gen).tolist()) for i, n in enumerate(lengths)]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def hf_generate(model, rows: list[list[int]], **kwargs) -> list[list[int]]:
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of(sides: dict, rounds: list, warmup: int = REQUESTS) -> dict[str, tuple[float, list]]:
    """Each side on each round in turn, after ``warmup`` requests of round 0 untimed: (best seconds, tokens of every
    timed round) per side."""
    for fn in sides.values():
        fn(rounds[0][:warmup])
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    tokens: dict[str, list] = {side: [] for side in sides}
    for batch in rounds[1:]:
        for side, fn in sides.items():
            start = time.perf_counter()
            tokens[side].append(fn(batch))
            seconds[side].append(time.perf_counter() - start)
    return {side: (min(seconds[side]), tokens[side]) for side in sides}


def run_hf(model_dir: Path, adapters: dict[str, str], rounds: list) -> dict[str, tuple[float, list]]:
    """fastprompt-generate and peft-loop, alternating: (best seconds, tokens of every timed round) per side."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import fastprompt

    fp_model = fastprompt.patch(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    for name, path in adapters.items():
        fastprompt.load_adapter(fp_model, path, name)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapters["a0"], adapter_name="a0"
    ).eval()
    for name, path in adapters.items():
        if name != "a0":
            peft_model.load_adapter(path, adapter_name=name)
    # vLLM's requests ignore the end-of-sequence token; so do these, so every answer has NEW_TOKENS tokens
    fp_model.generation_config.eos_token_id = None
    peft_model.base_model.generation_config.eos_token_id = None

    def fastprompt_side(batch):
        return hf_generate(fp_model, [p for _, p in batch], adapter_names=[n for n, _ in batch])

    def peft_side(batch):
        tokens: list = [None] * len(batch)
        for name in adapters:
            rows = [i for i, (n, _) in enumerate(batch) if n == name]
            peft_model.set_adapter(name)
            for i, out in zip(rows, hf_generate(peft_model, [batch[i][1] for i in rows]), strict=True):
                tokens[i] = out
        return tokens

    return best_of({"fastprompt-generate": fastprompt_side, "peft-loop": peft_side}, rounds, warmup=ADAPTERS)


def compile_model(model_dir: Path) -> None:
    """Start and stop a plain engine: its start compiles the model (torch.compile, cached on disk), so that the
    starts timed afterwards are comparable."""
    import vllm

    llm = vllm.LLM(model=str(model_dir), dtype="float32", block_size=BLOCK, skip_tokenizer_init=True,
                   max_model_len=MAX_MODEL_LEN)
    llm.llm_engine.engine_core.shutdown()


def run_vllm(model_dir: Path, adapters: dict[str, str] | None, rounds: list, fewshot: list[int]):
    """Engine start seconds and, per side, (best seconds, tokens of every timed round). Without ``adapters``: vLLM
    as it comes (no connector), plain requests and the few-shot text in front. With them: the connector, and every
    side in turn in the same engine: the adapters, plain requests, the few-shot prompt as a named prefix and as
    text in front."""
    import vllm

    from fastprompt.engines.vllm import PromptAdapters

    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    engine_args = {"block_size": BLOCK, "skip_tokenizer_init": True, "max_model_len": MAX_MODEL_LEN, "seed": 0}
    start = time.perf_counter()
    if adapters is None:
        llm = vllm.LLM(model=str(model_dir), dtype="float32", enable_prefix_caching=True, **engine_args)
    else:
        served = PromptAdapters(model_dir, adapters, prompts={"fewshot": fewshot})
        llm = vllm.LLM(**served.engine_args(**engine_args))
    start_s = time.perf_counter() - start

    def run(requests: list[tuple[dict, vllm.SamplingParams]]) -> list[list[int]]:
        outputs = llm.generate([r for r, _ in requests], [s for _, s in requests], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    sides = {
        "plain": lambda batch: run([({"prompt_token_ids": p}, params) for _, p in batch]),
        "fewshot-text": lambda batch: run([({"prompt_token_ids": fewshot + p}, params) for _, p in batch]),
    }
    if adapters is not None:
        sides["adapters"] = lambda batch: run([served.request(n, p, params) for n, p in batch])
        sides["fewshot-named"] = lambda batch: run([served.request("fewshot", p, params) for _, p in batch])
    best = best_of(sides, rounds)
    llm.llm_engine.engine_core.shutdown()
    return start_s, best


def header(command: str) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "peft"))
    cpu = platform.processor() or platform.machine()
    return [
        f"## vLLM with fastprompt adapters: CPU {cpu} ({torch.get_num_threads()} threads), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"- command: `{command}`",
        f"- commit: {commit}; {versions}; load average at the end: {os.getloadavg()[0]:.1f}",
        f"- model: random-weight Llama, hidden 256, 4 layers, 8 / 2 heads, vocab {VOCAB}, float32; "
        f"{ADAPTERS} prefix-tuning adapters of {PREFIX_LEN} virtual tokens; {REQUESTS} requests of "
        f"{PROMPT_LENS[0]}-{PROMPT_LENS[1]} tokens over them, {NEW_TOKENS} greedy new tokens each; vLLM block "
        f"size {BLOCK}, prefix caching on",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6,
                        help="timed rounds of each vLLM side, new prompts each (best kept)")
    parser.add_argument("--hf-rounds", type=int, default=2,
                        help="timed rounds of fastprompt-generate and peft-loop (PEFT's loop takes minutes per round)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/bench_vllm.py", *sys.argv[1:]])
    rounds = [prompts(seed) for seed in range(max(args.rounds, args.hf_rounds) + 1)]  # round 0 warms up
    fewshot = torch.randint(3, VOCAB, (FEWSHOT_LEN,), generator=torch.Generator().manual_seed(99)).tolist()
    new_tokens = REQUESTS * NEW_TOKENS

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(Path(tmp))
        hf = run_hf(model_dir, adapters, rounds[: args.hf_rounds + 1])
        compile_model(model_dir)
        plain_start, plain = run_vllm(model_dir, None, rounds[: args.rounds + 1], fewshot)
        served_start, served = run_vllm(model_dir, adapters, rounds[: args.rounds + 1], fewshot)

    def agreeing_rows(a: list, b: list) -> tuple[int, int]:
        """(rows where two sides gave the same tokens, rows compared), over the timed rounds both ran."""
        both = zip(a, b, strict=False)  # the HF sides may have run fewer rounds
        pairs = [(x, y) for round_a, round_b in both for x, y in zip(round_a, round_b, strict=True)]
        return sum(x == y for x, y in pairs), len(pairs)

    agree = agreeing_rows(served["adapters"][1], hf["fastprompt-generate"][1])
    agree_peft = agreeing_rows(hf["peft-loop"][1], hf["fastprompt-generate"][1])
    agree_fewshot = agreeing_rows(served["fewshot-named"][1], served["fewshot-text"][1])
    base = served["adapters"][0]

    def row(side: str, seconds: float, what: str) -> str:
        return f"| {side} | {what} | {seconds:.2f} | {new_tokens / seconds:,.0f} | {seconds / base:.2f}x |"

    lines = header(command) + [
        "",
        "| side | what | seconds | new tokens/s | its time / vllm-adapters' |",
        "|---|---|---:|---:|---:|",
        row("vllm-adapters", base, f"{ADAPTERS} adapters mixed in one batch (connector)"),
        row("vllm-plain", served["plain"][0], "no adapter, same engine (connector present, idle)"),
        row("vllm-plain", plain["plain"][0], "no adapter, vLLM as it comes (another engine, earlier)"),
        row("fastprompt-generate", hf["fastprompt-generate"][0], "patched transformers, one batch, adapter_names"),
        row("peft-loop", hf["peft-loop"][0], "PEFT, one batch per adapter"),
        "",
        f"| {FEWSHOT_LEN}-token few-shot prompt in front of each request | seconds | new tokens/s | "
        "its time / named prefix's |",
        "|---|---:|---:|---:|",
    ]
    named = served["fewshot-named"][0]
    for what, seconds in (
        ("named prefix (cache_prompt, connector)", named),
        ("vLLM's prefix caching of the same tokens, same engine", served["fewshot-text"][0]),
        ("vLLM's prefix caching of the same tokens, vLLM as it comes", plain["fewshot-text"][0]),
    ):
        lines.append(f"| {what} | {seconds:.2f} | {new_tokens / seconds:,.0f} | {seconds / named:.2f}x |")
    lines += [
        "",
        "| engine start (after a first start compiled the model) | seconds |",
        "|---|---:|",
        f"| vLLM, no adapter | {plain_start:.1f} |",
        f"| vLLM with {ADAPTERS} adapters and the few-shot prefix (compiling them included) | {served_start:.1f} |",
        "",
        f"- greedy tokens of the timed rounds: vllm-adapters equal fastprompt-generate on {agree[0]}/{agree[1]} rows, "
        f"peft-loop equal fastprompt-generate on {agree_peft[0]}/{agree_peft[1]}; the named few-shot prefix equal to "
        f"the text in front on {agree_fewshot[0]}/{agree_fewshot[1]}",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    if agree[0] != agree[1]:
        print(f"bench_vllm: vLLM with the adapters disagrees with fastprompt's generate on {agree[1] - agree[0]} rows: "
              "the timings above are of wrong answers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
