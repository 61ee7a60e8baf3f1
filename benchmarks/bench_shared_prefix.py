"""Decode-step benchmark: rows sharing bank rows, the op against a baseline and the naive path.

Usage::

    python benchmarks/bench_shared_prefix.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                             [--iters N] [--rounds N] [--threads N]

One decode step (one new token per row, a KV cache of S tokens per row) of a batch whose rows share bank
rows: all rows on one prefix, and pairs of rows on one prefix each. Three ways to compute it, forward
only, measured in alternating rounds (the best of each kept, ``fastprompt.bench.timing``):

- op: :func:`fastprompt.prefix_attention` with ``prefix_index`` on its ``auto`` backend. On CUDA that is
  the Triton backend, which groups such rows by bank row and reads each bank row once per group; on CPU
  the C++ backend, whose forward stacks the rows sharing a bank row into one work item;
- baseline: on CUDA the Triton decode path with grouping turned off (each row reads its bank row once
  per row); on CPU the ``torch`` backend (which also groups rows, with ATen matrix products);
- naive: :func:`fastprompt.attention.reference.naive_prefix_attention` (the prefix copied per row and
  concatenated).

Prints a markdown table headed by device, date, versions, commit and the command.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastprompt
from fastprompt.attention import AttentionArgs
from fastprompt.attention.reference import naive_prefix_attention
from fastprompt.bench.provenance import environment_lines
from fastprompt.bench.timing import Measurement, best_of_rounds, kernel_bench_options, measure

IMPLS = ("op", "baseline", "naive")


@dataclass(frozen=True)
class Case:
    """A decode step: q [B, Hq, 1, D]; k, v [B, Hkv, S, D]; a bank [N, Hkv, P, D], row b using bank row
    b // rows_per_prefix."""

    B: int
    Hq: int
    Hkv: int
    S: int
    P: int
    D: int
    rows_per_prefix: int

    @property
    def label(self) -> str:
        groups = self.B // self.rows_per_prefix
        return f"B={self.B}, {groups} prefix{'es' if groups > 1 else ''} x {self.rows_per_prefix} rows, P={self.P}"


def default_cases(device: str) -> list[Case]:
    if device == "cuda":
        base = dict(B=64, Hq=32, Hkv=8, S=256, P=2048, D=128)
    else:
        base = dict(B=32, Hq=8, Hkv=2, S=64, P=1024, D=64)
    return [Case(**base, rows_per_prefix=base["B"]), Case(**base, rows_per_prefix=2)]


def make_step(impl: str, case: Case, dtype: torch.dtype, device: str) -> Callable[[], torch.Tensor]:
    """One forward decode step of ``impl`` on fresh random inputs."""
    N = case.B // case.rows_per_prefix

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device)

    q, k, v = randn(case.B, case.Hq, 1, case.D), randn(case.B, case.Hkv, case.S, case.D), randn(
        case.B, case.Hkv, case.S, case.D)
    prefix_k, prefix_v = randn(N, case.Hkv, case.P, case.D), randn(N, case.Hkv, case.P, case.D)
    prefix_index = torch.arange(case.B, device=device) // case.rows_per_prefix
    if impl == "op":
        call = functools.partial(fastprompt.prefix_attention, q, k, v, prefix_k, prefix_v, prefix_index=prefix_index)
    elif impl == "baseline" and device == "cuda":
        from fastprompt.kernels import prefix_attention as triton_backend

        args = AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index).validated()
        call = functools.partial(triton_backend.forward, args, group_rows=False)
    elif impl == "baseline":
        call = functools.partial(fastprompt.prefix_attention, q, k, v, prefix_k, prefix_v, prefix_index=prefix_index,
                                 backend="torch")
    else:
        naive_args = AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index)
        call = functools.partial(naive_prefix_attention, naive_args)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            out = call()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return step


def run(cases: list[Case], dtype: torch.dtype, device: str, warmup: int, iters: int,
        rounds: int) -> list[tuple[Case, list[Measurement]]]:
    rows = []
    for case in cases:
        measurers = [functools.partial(measure, make_step(impl, case, dtype, device), device=device, warmup=warmup,
                                       iters=iters) for impl in IMPLS]
        rows.append((case, best_of_rounds(measurers, rounds=rounds)))
        print(f"  measured {case.label}", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[tuple[Case, list[Measurement]]]) -> str:
    lines = [
        "| case | op ms | baseline ms | naive ms | baseline / op | naive / op | op MiB | baseline MiB | naive MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, (op, baseline, naive) in rows:
        lines.append(
            f"| {case.label} | {op.ms:.3f} | {baseline.ms:.3f} | {naive.ms:.3f} | {baseline.ms / op.ms:.2f}x | "
            f"{naive.ms / op.ms:.2f}x | {op.peak_mib:.2f} | {baseline.peak_mib:.2f} | {naive.peak_mib:.2f} |"
        )
    return "\n".join(lines)


def header(cases: list[Case], device: str, dtype: torch.dtype, argv: list[str]) -> str:
    c = cases[0]
    return "\n".join(
        [
            "# shared-prefix decode step: the op vs a baseline vs the naive path",
            "",
            *environment_lines(torch.device(device), dtype, argv),
            f"- shape: Hq={c.Hq}, Hkv={c.Hkv}, D={c.D}, T=1 new token, S={c.S} cached tokens per row",
            "",
            "Forward only (inference mode). Median wall time per decode step (one layer's attention), the best "
            "of alternating rounds for each side; MiB = peak memory allocated during one call "
            "(fastprompt.bench.timing). op = fastprompt.prefix_attention on the auto backend; baseline = "
            + ("the Triton decode path with grouping off" if device == "cuda" else "the torch backend")
            + "; naive = prefix copied per row and concatenated (fastprompt.attention.reference).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, dtype, iters = kernel_bench_options(__doc__.split("\n\n")[0], argv, warmup=2, iters=(10, 50))
    cases = default_cases(args.device)
    rows = run(cases, dtype, args.device, args.warmup, iters, args.rounds)
    print(header(cases, args.device, dtype, ["benchmarks/bench_shared_prefix.py", *argv]))
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
