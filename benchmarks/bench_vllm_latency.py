"""Latency of requests arriving at random (Poisson) times: vLLM with fastprompt's adapters against fastprompt's own
``generate`` serving whatever has arrived as one batch.

Usage (in vLLM's environment, ``.ci/vllm-env DIR``)::

    DIR/bin/python benchmarks/bench_vllm_latency.py [--rate REQUESTS_PER_S] [--out PATH]

The workload of ``bench_vllm.py`` (random Llama, 16 prefix-tuning adapters of 32 virtual tokens, 64 requests of
48-80 tokens over them, 32 greedy new tokens), the requests arriving with exponential gaps at ``--rate`` per second
(fixed seed, the same times on both sides). Sides:

- vllm-adapters: vLLM's asynchronous engine (``AsyncLLM``) with the connector, each request handed over when it
  arrives, so vLLM's scheduler batches continuously;
- fastprompt-generate: whenever the model is free, every request that has arrived runs as one left-padded batch
  with ``adapter_names`` until all its rows have their tokens (static batching, as a transformers server would).

A request's latency is from its arrival to its last token. Tokens are checked equal between the sides before any
time is reported. Prints a markdown table headed by device, date, versions, commit and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vllm's workload, one builder for both scripts
from bench_vllm import BLOCK, MAX_MODEL_LEN, NEW_TOKENS, REQUESTS, build, header, hf_generate, prompts  # noqa: E402


def arrivals(rate: float, seed: int = 7) -> list[float]:
    """Arrival times (s) of REQUESTS requests with exponential gaps of mean ``1 / rate``."""
    gaps = torch.empty(REQUESTS).exponential_(rate, generator=torch.Generator().manual_seed(seed))
    return torch.cumsum(gaps, 0).tolist()


def percentile(values: list[float], q: float) -> float:
    return torch.quantile(torch.tensor(values), q).item()


async def run_vllm(model_dir: Path, adapters: dict[str, str], batch: list, times: list[float]):
    """(latencies, tokens) per request through vLLM's asynchronous engine."""
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from fastprompt.engines.vllm import PromptAdapters

    served = PromptAdapters(model_dir, adapters)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**served.engine_args(
        block_size=BLOCK, skip_tokenizer_init=True, max_model_len=MAX_MODEL_LEN, seed=0)))
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)

    async def one(i: int, name: str, prompt: list[int], start: float) -> tuple[float, list[int]]:
        request, sampling = served.request(name, prompt, params)
        async for output in engine.generate(request, sampling, f"{tag}-{i}"):
            last = output
        return time.perf_counter() - start, list(last.outputs[0].token_ids)

    async def at(i: int, delay: float, origin: float):
        await asyncio.sleep(max(0.0, origin + delay - time.perf_counter()))
        return await one(i, *batch[i], origin + delay)

    try:
        tag = "warmup"  # compiles and caches each adapter's prefix, as in steady serving
        await asyncio.gather(*(one(i, name, prompt, time.perf_counter()) for i, (name, prompt) in
                               enumerate(prompts(99)[:REQUESTS // 4])))
        tag = "timed"
        origin = time.perf_counter()
        results = await asyncio.gather(*(at(i, t, origin) for i, t in enumerate(times)))
    finally:
        engine.shutdown()
    return [r[0] for r in results], [r[1] for r in results]


def run_generate(model_dir: Path, adapters: dict[str, str], batch: list, times: list[float]):
    """(latencies, tokens, batch sizes) per request: arrived requests served as one batch whenever the model is
    free."""
    from transformers import AutoModelForCausalLM

    import fastprompt

    model = fastprompt.patch(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    for name, path in adapters.items():
        fastprompt.load_adapter(model, path, name)
    model.generation_config.eos_token_id = None
    warm = prompts(99)[:REQUESTS // 4]
    hf_generate(model, [p for _, p in warm], adapter_names=[n for n, _ in warm])

    latencies: list[float] = [0.0] * REQUESTS
    tokens: list = [None] * REQUESTS
    sizes = []
    served = 0
    origin = time.perf_counter()
    while served < REQUESTS:
        now = time.perf_counter() - origin
        if times[served] > now:
            time.sleep(times[served] - now)
            now = times[served]
        arrived = [i for i in range(served, REQUESTS) if times[i] <= now]
        out = hf_generate(model, [batch[i][1] for i in arrived], adapter_names=[batch[i][0] for i in arrived])
        done = time.perf_counter() - origin
        for i, row in zip(arrived, out, strict=True):
            latencies[i], tokens[i] = done - times[i], row
        sizes.append(len(arrived))
        served += len(arrived)
    return latencies, tokens, sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/bench_vllm_latency.py", *sys.argv[1:]])
    batch, times = prompts(1), arrivals(args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build(Path(tmp))
        hf_latency, hf_tokens, sizes = run_generate(model_dir, adapters, batch, times)
        vllm_latency, vllm_tokens = asyncio.run(run_vllm(model_dir, adapters, batch, times))
    agree = sum(a == b for a, b in zip(vllm_tokens, hf_tokens, strict=True))
    lines = header(command) + [
        f"- the requests arrive at {args.rate:g} per second on average "
        f"(exponential gaps, the last at {times[-1]:.2f} s); latency from arrival to the last of {NEW_TOKENS} tokens",
        "",
        "| side | p50 latency (s) | p95 latency (s) | mean (s) | last answer at (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, latency in (("vllm-adapters (AsyncLLM, continuous batching)", vllm_latency),
                          ("fastprompt-generate (arrived requests as one batch)", hf_latency)):
        last = max(t + lat for t, lat in zip(times, latency, strict=True))
        lines.append(f"| {side} | {percentile(latency, 0.5):.2f} | {percentile(latency, 0.95):.2f} | "
                     f"{sum(latency) / len(latency):.2f} | {last:.2f} |")
    lines += ["", f"- fastprompt-generate ran {len(sizes)} batches of {', '.join(map(str, sizes))} requests",
              f"- greedy tokens: the sides agree on {agree}/{REQUESTS} requests"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    if agree != REQUESTS:
        print(f"bench_vllm_latency: the sides disagree on {REQUESTS - agree} requests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
