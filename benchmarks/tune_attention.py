"""Sweep the Triton attention tile table on a GPU: which (BLOCK_M, BLOCK_N, warps, stages) is fastest for
each kernel of ``fastprompt.kernels.prefix_attention`` at issue 2's GPU shape.

Usage (CUDA only; about 5 minutes on an H100)::

    python benchmarks/tune_attention.py [--dtype bfloat16] [--head-dims 64 128] [--T 2048]

The shipped table (``prefix_attention.shipped_config``) is fixed, not autotuned, so results stay deterministic and
the first call pays no tuning; this script is how that table is chosen. For each head dim it times the
forward alone for every forward candidate, then the backward for every dq candidate (dk/dv on the shipped
tiles) and every dk/dv candidate (dq on the shipped tiles; the prefix-gradient kernel shares the dk/dv
tiles, so those rows move it too), with ``triton.testing.do_bench`` (median of
CUDA-event timings, fresh random inputs per head dim). Candidates that do not fit the GPU's shared memory
are reported as such. Useful TFLOP/s count attended (query, key) pairs only, as ``bench_attention.py``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import replace

import torch

from fastprompt.attention import AttentionArgs
from fastprompt.bench.attention import Case, make_inputs, training_case
from fastprompt.bench.provenance import environment
from fastprompt.kernels import prefix_attention as pa

CANDIDATES = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3),
            (64, 128, 4, 2)],
    "dq": [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    "dkdv": [(32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (16, 64, 4, 3)],
}


def _time(fn) -> float | None:
    import triton

    try:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a candidate that does not fit is a result, not a failure
        if "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower():
            return None
        raise


def sweep(case: Case, dtype: torch.dtype, device: str = "cuda", timer: Callable = _time) -> list[str]:
    """Table rows for every candidate of every kernel on ``case``; ``timer(fn)`` gives ms or None (does not
    fit). Each candidate is handed to the kernels as a tile table (``tiles=``); nothing global changes."""
    args = AttentionArgs(**make_inputs(case, dtype, device, requires_grad=False), causal=True).validated()
    flops = case.flops()
    out, lse = pa.forward(args)
    grad = torch.randn_like(out)
    rows = []
    for kernel, work in (("fwd", flops), ("dq", 2.5 * flops), ("dkdv", 2.5 * flops)):
        ship = pa.shipped_config(args.q, kernel)
        for tiles in CANDIDATES[kernel]:
            table = {kernel: pa.Config(*tiles)}
            if kernel == "fwd":
                fn = functools.partial(pa.forward, args, tiles=table)
            else:
                fn = functools.partial(pa.backward, args, out, lse, grad, None, tiles=table)
            ms = timer(fn)
            mark = " (shipped)" if tuple(ship) == tiles else ""
            timing = "does not fit" if ms is None else f"{ms:.3f} | {work / ms / 1e9:.0f}"
            rows.append(f"| D={case.D} | {kernel} | {tiles}{mark} | {timing} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--T", type=int, default=2048)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    env = environment(torch.device("cuda"), dtype)
    print(f"device: {env.get('device')}  torch {torch.__version__}  commit {env.get('commit')}")
    print(f"command: python benchmarks/tune_attention.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| head dim | kernel | (BLOCK_M, BLOCK_N, warps, stages) | ms | useful TFLOP/s |\n|---|---|---|---|---|")
    for D in args.head_dims:
        for row in sweep(replace(training_case("Llama-3.2-1B", args.T, 128, causal=True), B=8, D=D), dtype):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
