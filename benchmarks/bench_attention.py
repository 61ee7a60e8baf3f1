"""Kernel benchmark: ``fastprompt.prefix_attention`` against the naive PEFT path and against SDPA without
any prefix, on a grid of shapes standing for real models.

Usage::

    python benchmarks/bench_attention.py [--full] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                         [--iters N] [--rounds N] [--threads N] [--csv PATH]

Prints a markdown table (device, date, versions, commit and the command on top, so the output can be
committed under ``benchmarks/results/``): forward and forward+backward median time and peak memory of
fastprompt (backend ``auto``, or ``FASTPROMPT_BACKEND``), of
:func:`fastprompt.attention.reference.naive_prefix_attention` (expand the prefix per row, ``torch.cat`` onto
K/V, 4-D mask, SDPA) and of SDPA on the same q/k/v without the prefix (what the prefix costs on top of
plain attention), the three measured in turn in one run.

The grid (:func:`fastprompt.bench.attention.grid_cases`): the head geometries of ``GEOMETRIES``, prefix
lengths ``PREFIX_LENS``, sequence lengths ``SEQ_LENS`` (``B * T`` = ``TOKENS``), causal and
bidirectional, plus one decode row per geometry (one new token per row against its own KV cache of
``DECODE_CACHE`` tokens, one prefix of ``DECODE_PREFIX`` shared by the batch), all in
:mod:`fastprompt.bench.attention`, which ``fastprompt bench``'s attention rows share. ``--full`` runs the
whole cross product (120 training shapes, six times the default's training rows); the default runs a
sample of 20 that still has every geometry with every P, every T and both maskings, and every P with every
T and both maskings: geometry ``i`` with prefix length ``j`` takes ``T = SEQ_LENS[(i + j) % 3]`` and is causal
when ``i + j`` is even.

``benchmarks/test_bench_attention.py`` times the same builders with pytest-benchmark.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass

import torch

from fastprompt.bench.attention import (
    CALLS,
    MODES,
    Case,
    check_against_reference,
    fastprompt_call,
    grid_cases,
    sdpa_call,
    timed,
    training_case,
)
from fastprompt.bench.provenance import environment_lines
from fastprompt.bench.timing import Measurement, best_of_rounds, kernel_bench_options, write_csv


@dataclass(frozen=True)
class Row:
    case: Case
    mode: str
    fast: Measurement
    naive: Measurement
    sdpa: Measurement  # the sequence alone, without the prefix

    def record(self) -> dict[str, object]:
        return {
            **asdict(self.case),
            "mode": self.mode,
            "fastprompt_ms": round(self.fast.ms, 4),
            "naive_ms": round(self.naive.ms, 4),
            "sdpa_no_prefix_ms": round(self.sdpa.ms, 4),
            "vs_naive": round(self.naive.ms / self.fast.ms, 3),
            "vs_sdpa_no_prefix": round(self.sdpa.ms / self.fast.ms, 3),
            "fastprompt_peak_mib": round(self.fast.peak_mib, 3),
            "naive_peak_mib": round(self.naive.peak_mib, 3),
        }


def run(cases: list[Case], dtype: torch.dtype, device: str, warmup: int, iters: int, rounds: int) -> list[Row]:
    """Each row: fastprompt, the naive path and SDPA without the prefix measured in turn for ``rounds``
    rounds, the best of each kept, after a check of the case against the float64 oracle."""
    rows = []
    for number, case in enumerate(cases, 1):
        check_against_reference(case, dtype, device)
        for mode in MODES if case.trains else MODES[:1]:
            fast, naive, sdpa = best_of_rounds(
                [functools.partial(timed, call, case, mode, dtype, device, warmup, iters) for call in CALLS.values()],
                rounds=rounds,
            )
            rows.append(Row(case, mode, fast, naive, sdpa))
            print(f"  [{number}/{len(cases)}] measured {case.label} {mode}", file=sys.stderr, flush=True)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def format_table(rows: list[Row]) -> str:
    lines = [
        "| case | pass | fastprompt ms | naive ms | SDPA no prefix ms | vs naive | vs SDPA no prefix "
        "| fastprompt MiB | naive MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case.label} | {row.mode} | {row.fast.ms:.2f} | {row.naive.ms:.2f} | {row.sdpa.ms:.2f} | "
            f"{_ratio(row.naive.ms, row.fast.ms)} | {_ratio(row.sdpa.ms, row.fast.ms)} | "
            f"{row.fast.peak_mib:.1f} | {row.naive.peak_mib:.1f} |"
        )
    return "\n".join(lines)


def format_summary(rows: list[Row]) -> str:
    """Worst and median ratios per pass, and the rows below the targets (1.0x naive; 0.9x SDPA without the
    prefix where P <= T / 4; 3x naive for decode)."""
    lines = ["| pass | rows | worst vs naive | median vs naive | worst vs SDPA no prefix (P <= T/4) |",
             "|---|---:|---:|---:|---:|"]
    for mode, kind in ((MODES[0], "training shapes"), (MODES[1], "training shapes"), (MODES[0], "decode")):
        chosen = [r for r in rows if r.mode == mode and r.case.trains == (kind != "decode")]
        if not chosen:
            continue
        vs_naive = sorted(r.naive.ms / r.fast.ms for r in chosen)
        short = [r.sdpa.ms / r.fast.ms for r in chosen if 4 * r.case.P <= r.case.T]
        lines.append(
            f"| {mode}, {kind} | {len(chosen)} | {vs_naive[0]:.2f}x | {vs_naive[len(vs_naive) // 2]:.2f}x | "
            f"{f'{min(short):.2f}x' if short else 'n/a'} |"
        )
    below = [
        f"- {r.case.label} {r.mode}: {r.naive.ms / r.fast.ms:.2f}x naive, {r.sdpa.ms / r.fast.ms:.2f}x SDPA no prefix"
        for r in rows
        if r.naive.ms / r.fast.ms < (3.0 if not r.case.trains else 1.0)
        or (4 * r.case.P <= r.case.T and r.sdpa.ms / r.fast.ms < 0.9)
    ]
    return "\n".join([*lines, "", "Rows below a target:" if below else "Every row meets its target.", *below])


def format_tflops(case: Case, dtype: torch.dtype, device: str, warmup: int, iters: int) -> str:
    """Useful TFLOP/s of fastprompt (with prefix) and SDPA flash (no prefix) on one case."""
    lines = [
        "| kernel | pass | ms | useful TFLOP/s |",
        "|---|---|---:|---:|",
    ]
    kernels = (("fastprompt", fastprompt_call, True), ("SDPA flash, no prefix", sdpa_call, False))
    for name, call, with_prefix in kernels:
        flops = case.flops(with_prefix)
        for mode, work in (("forward", flops), ("backward", 2.5 * flops)):
            ms = timed(call, case, mode, dtype, device, warmup, iters).ms
            lines.append(f"| {name} | {mode} | {ms:.3f} | {work / ms / 1e9:.1f} |")
    return "\n".join(lines)


def header(device: str, dtype: torch.dtype, argv: list[str]) -> str:
    return "\n".join(
        [
            "# prefix attention: fastprompt vs the naive PEFT path vs SDPA without the prefix",
            "",
            *environment_lines(torch.device(device), dtype, argv),
            "",
            "Median wall time per call, the best of alternating rounds for each of the three; MiB = peak memory "
            "allocated during one call (fastprompt.bench.timing). vs = the other's time over fastprompt's "
            "(above 1 = fastprompt faster).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, dtype, iters = kernel_bench_options(
        __doc__.split("\n\n")[0], argv, warmup=1, iters=(3, 20), csv=True,
        switches=[("full", "the whole cross product of the grid (six times the default's training rows)")],
    )
    rows = run(grid_cases(args.full), dtype, args.device, args.warmup, iters, args.rounds)
    print(header(args.device, dtype, ["benchmarks/bench_attention.py", *argv]))
    print()
    print(format_summary(rows))
    print()
    print(format_table(rows))
    if args.device == "cuda":
        print()
        print(format_tflops(training_case("Llama-3.2-1B", 1024, 64, True), dtype, args.device, args.warmup, iters))
    if args.csv:
        write_csv(args.csv, [row.record() for row in rows])


if __name__ == "__main__":
    main()
