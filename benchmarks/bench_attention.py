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

The grid (:func:`grid_cases`): the head geometries of :data:`GEOMETRIES`, prefix lengths
:data:`PREFIX_LENS`, sequence lengths :data:`SEQ_LENS` (``B * T`` = :data:`TOKENS`), causal and
bidirectional, plus one decode row per geometry (one new token per row against its own KV cache of
:data:`DECODE_CACHE` tokens, one prefix of :data:`DECODE_PREFIX` shared by the batch). ``--full`` runs the
whole cross product (120 training shapes, six times the default's training rows); the default runs a
sample of 20 that still has every geometry with every P, every T and both maskings, and every P with every
T and both maskings: geometry ``i`` with prefix length ``j`` takes ``T = SEQ_LENS[(i + j) % 3]`` and is causal
when ``i + j`` is even.

The case builders (:func:`grid_cases`, :func:`make_step` with :func:`fastprompt_call`, :func:`naive_call` or
:func:`sdpa_call`) are reused by ``benchmarks/test_bench_attention.py``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.attention import AttentionArgs
from fastprompt.attention.cases import TOLERANCE, make_case, max_error, scale_of
from fastprompt.attention.reference import naive_prefix_attention, reference_prefix_attention
from fastprompt.bench.provenance import environment_lines
from fastprompt.bench.timing import Measurement, best_of_rounds, kernel_bench_options, measure

MODES = ("forward", "forward+backward")

GEOMETRIES = {
    # name: (query heads, KV heads, head dim) of one attention layer
    "SmolLM2-135M": (9, 3, 64),
    "MiniLM-L12": (12, 12, 32),
    "BERT-base": (12, 12, 64),
    "Llama-3.2-1B": (32, 8, 64),
    "Qwen2.5-0.5B": (14, 2, 64),
}
PREFIX_LENS = (16, 64, 200, 512)
SEQ_LENS = (64, 256, 1024)
TOKENS = 1024
DECODE_BATCH, DECODE_CACHE, DECODE_PREFIX = 32, 256, 512


@dataclass(frozen=True)
class Case:
    """One attention problem: q [B, Hq, T, D]; k, v [B, Hkv, S, D]; a bank of one prefix [1, Hkv, P, D]
    shared by the batch. ``T == 1`` is a decode step against a per-row cache of ``S`` tokens."""

    model: str
    B: int
    Hq: int
    Hkv: int
    T: int
    S: int
    P: int
    D: int
    causal: bool = True

    @property
    def label(self) -> str:
        if self.T == 1:
            return f"{self.model} decode B={self.B} S={self.S} P={self.P}"
        return f"{self.model} B={self.B} T={self.T} P={self.P} {'causal' if self.causal else 'bidirectional'}"

    @property
    def trains(self) -> bool:
        """Decode is inference only."""
        return self.T > 1

    def attended_pairs(self, with_prefix: bool = True) -> int:
        """(query, key) pairs that carry weight, per head and batch row (the useful work)."""
        offset = self.S - self.T
        sequence = sum(min(self.S, offset + t + 1) for t in range(self.T)) if self.causal else self.T * self.S
        return sequence + (self.T * self.P if with_prefix else 0)

    def flops(self, with_prefix: bool = True) -> float:
        """Useful forward FLOPs: two matmuls of 2 * D per attended pair (backward counts 2.5x this)."""
        return 4.0 * self.B * self.Hq * self.D * self.attended_pairs(with_prefix)


def training_case(model: str, T: int, P: int, causal: bool) -> Case:
    Hq, Hkv, D = GEOMETRIES[model]
    return Case(model, B=max(1, TOKENS // T), Hq=Hq, Hkv=Hkv, T=T, S=T, P=P, D=D, causal=causal)


def decode_case(model: str) -> Case:
    Hq, Hkv, D = GEOMETRIES[model]
    return Case(model, B=DECODE_BATCH, Hq=Hq, Hkv=Hkv, T=1, S=DECODE_CACHE, P=DECODE_PREFIX, D=D)


def grid_cases(full: bool = False) -> list[Case]:
    """The training shapes (the sample described in the module docstring, or with ``full`` the cross
    product), then one decode row per geometry."""
    models = list(GEOMETRIES)
    if full:
        training = [training_case(m, T, P, causal) for m, P, T, causal in
                    itertools.product(models, PREFIX_LENS, SEQ_LENS, (True, False))]
    else:
        training = [training_case(m, SEQ_LENS[(i + j) % len(SEQ_LENS)], P, (i + j) % 2 == 0)
                    for i, m in enumerate(models) for j, P in enumerate(PREFIX_LENS)]
    return [*training, *(decode_case(m) for m in models)]


def make_inputs(case: Case, dtype: torch.dtype, device: str, requires_grad: bool) -> dict[str, torch.Tensor]:
    """Random q, k, v and a one-prefix bank from the tests' case builder, as leaves when ``requires_grad``."""
    built = make_case(B=case.B, Hq=case.Hq, Hkv=case.Hkv, T=case.T, S=case.S, P=case.P, N=1, D=case.D,
                      dtype=dtype, device=device, causal=case.causal, requires_grad=requires_grad)
    return dict(zip(AttentionArgs.DIFFERENTIABLE, built.tensors, strict=True))


def fastprompt_call(case: Case, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return fastprompt.prefix_attention(**x, causal=case.causal)


def naive_call(case: Case, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return naive_prefix_attention(AttentionArgs(**x, causal=case.causal))


def sdpa_call(case: Case, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """SDPA on the sequence alone (no prefix; its flash kernel on CUDA): plain attention, what a prefix adds to."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flash = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if x["q"].is_cuda else contextlib.nullcontext()
    with flash:
        # SDPA's causal mask is aligned top-left: a single query (decode) sees its whole cache
        return F.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], is_causal=case.causal and case.T > 1, enable_gqa=True
        )


def make_step(
    call: Callable[[Case, dict[str, torch.Tensor]], torch.Tensor],
    case: Case,
    mode: str,
    dtype: torch.dtype,
    device: str,
) -> Callable[[], object]:
    """One call on fresh random inputs. ``mode``: "forward" (under ``no_grad``), "forward+backward" (the
    output and the gradients of all five inputs, returned so that their memory counts), or "backward"
    (the gradients alone, from one forward done here). Synchronises CUDA at the end."""
    x = make_inputs(case, dtype, device, requires_grad=mode != "forward")
    leaves = list(x.values())
    grad_out = torch.randn(case.B, case.Hq, case.T, case.D, dtype=dtype, device=device)
    kept_out = call(case, x) if mode == "backward" else None

    def gradients(out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # The no-prefix SDPA reference leaves the prefix unused.
        return torch.autograd.grad(out, leaves, grad_out, retain_graph=kept_out is not None, allow_unused=True)

    def step() -> object:
        if mode == "forward":
            with torch.no_grad():
                result = call(case, x)
        elif mode == "backward":
            result = gradients(kept_out)
        else:
            out = call(case, x)
            result = out, gradients(out)
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    return step


def timed(
    call: Callable[[Case, dict[str, torch.Tensor]], torch.Tensor],
    case: Case,
    mode: str,
    dtype: torch.dtype,
    device: str,
    warmup: int,
    iters: int,
) -> Measurement:
    """Median time and peak memory of :func:`make_step`."""
    return measure(make_step(call, case, mode, dtype, device), device=device, warmup=warmup, iters=iters)


CALLS = {"fastprompt": fastprompt_call, "naive": naive_call, "sdpa": sdpa_call}


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


def check_against_reference(case: Case, dtype: torch.dtype, device: str) -> None:
    """Refuse to time a result that is wrong: fastprompt on the case's first batch row against the float64
    oracle, held to the tests' tolerance table."""
    x = {name: t[:1] if name in ("q", "k", "v") else t for name, t in make_inputs(case, dtype, device, False).items()}
    with torch.no_grad():
        out = fastprompt_call(case, x)
        expected, _ = reference_prefix_attention(AttentionArgs(**x, causal=case.causal))
    err, bound = max_error(out, expected), TOLERANCE[dtype].out * scale_of(expected)
    if err > bound:
        raise RuntimeError(f"{case.label}: fastprompt differs from the float64 oracle by {err:.3g} > {bound:.3g}")


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
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].record()))
            writer.writeheader()
            writer.writerows(row.record() for row in rows)


if __name__ == "__main__":
    main()
