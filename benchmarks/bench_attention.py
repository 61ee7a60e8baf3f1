"""Kernel benchmark: ``fastprompt.prefix_attention`` against the naive PEFT path, one dimension at a time.

Usage::

    python benchmarks/bench_attention.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                         [--iters N] [--rounds N] [--threads N] [--csv PATH]

Prints a markdown table (device, date, versions, commit and the command on top, so the output can be
committed under ``benchmarks/results/``): forward and forward+backward median time and peak memory of
fastprompt (backend ``auto``, or ``FASTPROMPT_BACKEND``) and of
:func:`fastprompt.attention.reference.naive_prefix_attention`
(expand the prefix per row, ``torch.cat`` onto K/V, 4-D mask, SDPA), swept over the sequence length T,
then over the prefix length P, plus the decode case (one new token, one prefix shared by the batch).
On CUDA it adds SDPA's flash kernel without any prefix as a speed-of-light reference in TFLOP/s.

The case builders (:func:`default_cases`, :func:`make_step` with :func:`fastprompt_call` or
:func:`naive_call`) are reused by ``benchmarks/test_bench_attention.py``.
"""

from __future__ import annotations

import csv
import functools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.attention import AttentionArgs
from fastprompt.attention.cases import TOLERANCE, make_case, max_error, scale_of
from fastprompt.attention.reference import naive_prefix_attention, reference_prefix_attention
from fastprompt.bench.provenance import environment_lines
from fastprompt.bench.timing import Measurement, best_of_rounds, kernel_bench_options, measure

MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Case:
    """One attention problem: q [B, Hq, T, D]; k, v [B, Hkv, S, D]; a bank of one prefix [1, Hkv, P, D]."""

    sweep: str  # which dimension this row varies: "T", "P" or "decode"
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
        return {"T": f"T={self.T}", "P": f"P={self.P}"}.get(
            self.sweep, f"decode B={self.B} S={self.S} P={self.P}"
        )

    @property
    def trains(self) -> bool:
        """Decode is inference only."""
        return self.sweep != "decode"

    def attended_pairs(self, with_prefix: bool = True) -> int:
        """(query, key) pairs that carry weight, per head and batch row (the useful work)."""
        offset = self.S - self.T
        sequence = sum(min(self.S, offset + t + 1) for t in range(self.T)) if self.causal else self.T * self.S
        return sequence + (self.T * self.P if with_prefix else 0)

    def flops(self, with_prefix: bool = True) -> float:
        """Useful forward FLOPs: two matmuls of 2 * D per attended pair (backward counts 2.5x this)."""
        return 4.0 * self.B * self.Hq * self.D * self.attended_pairs(with_prefix)


def base_case(device: str) -> Case:
    """The case both sweeps start from (and the TFLOP/s comparison on CUDA)."""
    if device == "cuda":
        return Case("T", B=8, Hq=32, Hkv=8, T=2048, S=2048, P=128, D=128)
    return Case("T", B=4, Hq=8, Hkv=2, T=512, S=512, P=64, D=64)


def decode_case(device: str) -> Case:
    """One new token per row against a KV cache, one long prefix shared by the whole batch."""
    if device == "cuda":
        return Case("decode", B=32, Hq=32, Hkv=8, T=1, S=1024, P=1024, D=128)
    return Case("decode", B=32, Hq=8, Hkv=2, T=1, S=64, P=1024, D=64)


def default_cases(device: str) -> list[Case]:
    """The T sweep, the P sweep (both from :func:`base_case`), and :func:`decode_case`."""
    base = base_case(device)
    t_values, p_values = ((512, 1024, 2048, 4096), (32, 128, 512, 2048)) if device == "cuda" else (
        (128, 256, 512, 1024), (16, 64, 256, 1024))
    return [
        *(replace(base, sweep="T", T=t, S=t) for t in t_values),
        *(replace(base, sweep="P", P=p) for p in p_values),
        decode_case(device),
    ]


def make_inputs(case: Case, dtype: torch.dtype, device: str, requires_grad: bool) -> dict[str, torch.Tensor]:
    """Random q, k, v and a one-prefix bank from the tests' case builder, as leaves when ``requires_grad``."""
    built = make_case(B=case.B, Hq=case.Hq, Hkv=case.Hkv, T=case.T, S=case.S, P=case.P, N=1, D=case.D,
                      dtype=dtype, device=device, causal=case.causal, requires_grad=requires_grad)
    return dict(zip(AttentionArgs.DIFFERENTIABLE, built.tensors, strict=True))


def fastprompt_call(case: Case, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return fastprompt.prefix_attention(**x, causal=case.causal)


def naive_call(case: Case, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return naive_prefix_attention(AttentionArgs(**x, causal=case.causal))


def sdpa_flash_call(case: Case, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """SDPA's flash kernel on the sequence alone (no prefix): the reference for achievable TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=case.causal, enable_gqa=True)


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


@dataclass(frozen=True)
class Row:
    case: Case
    mode: str
    fast: Measurement
    naive: Measurement

    def record(self) -> dict[str, object]:
        return {
            **asdict(self.case),
            "mode": self.mode,
            "fastprompt_ms": round(self.fast.ms, 4),
            "naive_ms": round(self.naive.ms, 4),
            "speedup": round(self.naive.ms / self.fast.ms, 3),
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
    """Each row: fastprompt and the naive path measured in turn for ``rounds`` rounds, the best of each kept,
    after a check of the case against the float64 oracle."""
    rows = []
    for case in cases:
        check_against_reference(case, dtype, device)
        for mode in MODES if case.trains else MODES[:1]:
            fast, naive = best_of_rounds(
                [functools.partial(timed, call, case, mode, dtype, device, warmup, iters)
                 for call in (fastprompt_call, naive_call)],
                rounds=rounds,
            )
            rows.append(Row(case, mode, fast, naive))
            print(f"  measured {case.label} {mode}", file=sys.stderr, flush=True)
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def format_table(rows: list[Row]) -> str:
    lines = [
        "| sweep | case | pass | fastprompt ms | naive ms | speedup "
        "| fastprompt MiB | naive MiB | naive/fastprompt memory |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.case.sweep} | {row.case.label} | {row.mode} | {row.fast.ms:.2f} | {row.naive.ms:.2f} | "
            f"{_ratio(row.naive.ms, row.fast.ms)} | {row.fast.peak_mib:.1f} | {row.naive.peak_mib:.1f} | "
            f"{_ratio(row.naive.peak_mib, row.fast.peak_mib)} |"
        )
    return "\n".join(lines)


def format_tflops(case: Case, dtype: torch.dtype, device: str, warmup: int, iters: int) -> str:
    """Useful TFLOP/s of fastprompt (with prefix) and SDPA flash (no prefix) on the base case."""
    lines = [
        "| kernel | pass | ms | useful TFLOP/s |",
        "|---|---|---:|---:|",
    ]
    kernels = (("fastprompt", fastprompt_call, True), ("SDPA flash, no prefix", sdpa_flash_call, False))
    for name, call, with_prefix in kernels:
        flops = case.flops(with_prefix)
        for mode, work in (("forward", flops), ("backward", 2.5 * flops)):
            ms = timed(call, case, mode, dtype, device, warmup, iters).ms
            lines.append(f"| {name} | {mode} | {ms:.3f} | {work / ms / 1e9:.1f} |")
    return "\n".join(lines)


def header(device: str, dtype: torch.dtype, argv: list[str]) -> str:
    return "\n".join(
        [
            "# prefix attention: fastprompt vs naive PEFT path",
            "",
            *environment_lines(torch.device(device), dtype, argv),
            "",
            "Median wall time per call, the better of alternating rounds for each side; MiB = peak memory "
            "allocated during one call (fastprompt.bench.timing).",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, dtype, iters = kernel_bench_options(__doc__.split("\n\n")[0], argv, warmup=1, iters=(3, 20), csv=True)
    cases = default_cases(args.device)
    rows = run(cases, dtype, args.device, args.warmup, iters, args.rounds)
    print(header(args.device, dtype, ["benchmarks/bench_attention.py", *argv]))
    print()
    print(format_table(rows))
    if args.device == "cuda":
        print()
        print(format_tflops(base_case(args.device), dtype, args.device, args.warmup, iters))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].record()))
            writer.writeheader()
            writer.writerows(row.record() for row in rows)


if __name__ == "__main__":
    main()
