"""The attention grid: head geometries of real models, prefix and sequence lengths, and the three calls a
row times side by side: ``fastprompt.prefix_attention``, the naive PEFT path
(:func:`fastprompt.attention.reference.naive_prefix_attention`: expand the prefix per row, ``torch.cat`` onto
K/V, 4-D mask, SDPA) and SDPA on the same q/k/v without the prefix (what a prefix adds to plain attention).

``benchmarks/bench_attention.py`` runs the whole grid; ``fastprompt bench`` runs :func:`bench_cases`, one
training shape and one decode step per geometry (its ``attention`` rows).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.attention import AttentionArgs
from fastprompt.attention.cases import TOLERANCE, make_case, max_error, scale_of
from fastprompt.attention.reference import naive_prefix_attention, reference_prefix_attention
from fastprompt.bench.timing import Measurement, measure

__all__ = [
    "BENCH_SHAPE", "CALLS", "DECODE_BATCH", "DECODE_CACHE", "DECODE_PREFIX", "GEOMETRIES", "MODES", "PREFIX_LENS",
    "SEQ_LENS", "TOKENS", "Case", "bench_cases", "check_against_reference", "decode_case", "fastprompt_call",
    "grid_cases", "make_inputs", "make_step", "naive_call", "sdpa_call", "timed", "training_case",
]

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
    """The training shapes, then one decode row per geometry. ``full``: the cross product of geometries,
    prefix lengths, sequence lengths and maskings (120 shapes); else a sample of 20 in which every geometry meets
    every P, every T and both maskings: geometry ``i`` with prefix length ``j`` takes
    ``T = SEQ_LENS[(i + j) % 3]`` and is causal when ``i + j`` is even."""
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


BENCH_SHAPE = (256, 64)
"""(T, P) of ``fastprompt bench``'s training rows: a prefix a quarter of the tokens, the longest the SDPA target
(0.9x of SDPA without the prefix) covers."""


def bench_cases() -> list[Case]:
    """``fastprompt bench``'s attention rows: per geometry one causal training shape (:data:`BENCH_SHAPE`)
    and one decode step."""
    T, P = BENCH_SHAPE
    return [case for model in GEOMETRIES for case in (training_case(model, T, P, True), decode_case(model))]
