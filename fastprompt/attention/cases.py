"""Attention problems and error bounds shared by every backend's tests and by the attention benchmark.

:func:`make_case` builds random inputs of the op from a shape (never zeros; the caller's generator makes
it reproducible); :data:`TOLERANCE` is the one table of how far a backend may be from the float64 oracle
(:func:`fastprompt.attention.reference.reference_prefix_attention`), measured by :func:`max_error` as the
largest absolute error over the output's scale, ``max(1, max |expected|)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastprompt.attention.args import AttentionArgs

__all__ = ["TOLERANCE", "Case", "Tolerance", "make_case", "max_error", "scale_of"]


class Tolerance(NamedTuple):
    out: float  # output and lse
    grad: float  # the five gradients


# Largest error over max(1, max |reference|) per input dtype. fp16/bf16: probabilities are rounded to the
# input dtype before P @ V and results are stored in it (a few half-ulps: fp16 4.9e-4, bf16 3.9e-3);
# gradients add the rounding of dS and of O inside delta. float64 gradients: the lse output is float32 by
# contract, so a gradient arriving through it carries float32 rounding.
TOLERANCE = {
    torch.float64: Tolerance(1e-10, 1e-7),
    torch.float32: Tolerance(3e-5, 2e-4),
    torch.float16: Tolerance(3e-3, 2e-2),
    torch.bfloat16: Tolerance(2e-2, 8e-2),
}


@dataclasses.dataclass
class Case:
    """Inputs of one call: the five tensors and the keyword options of :func:`fastprompt.prefix_attention`."""

    q: torch.Tensor  # [B, Hq, T, D]
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor  # [B, Hkv, S, D]
    prefix_k: torch.Tensor  # [N, Hkv, P, D]
    prefix_v: torch.Tensor  # [N, Hkv, P, D]
    options: dict

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.prefix_k, self.prefix_v]

    def record(self, **overrides) -> AttentionArgs:
        """The case as the op's raw argument record (what the float64 oracle and the naive path take)."""
        return AttentionArgs(*self.tensors, **{**self.options, **overrides})

    def args(self, **overrides) -> AttentionArgs:
        """The validated record a backend's ``forward``/``backward`` takes (for backend-level tests)."""
        return self.record(**overrides).validated()


def make_case(
    *,
    B: int = 2,
    Hq: int = 4,
    Hkv: int = 2,
    T: int = 5,
    S: int | None = None,
    P: int = 6,
    N: int = 1,
    D: int = 32,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    padding: str | Sequence[tuple[int, int]] | None = None,
    causal: bool = True,
    prefix_index: Sequence[int] | None = None,
    prefix_lens: Sequence[int] | None = None,
    magnitude: float = 1.0,
    strided: bool = False,
    requires_grad: bool = True,
    generator: torch.Generator | None = None,
) -> Case:
    """Random standard-normal inputs (times ``magnitude``), drawn in float32 on the CPU from ``generator``
    (the global one if ``None``) and then cast and moved, so every dtype and device sees the same values.

    ``padding``: ``"left"``/``"right"`` pads each row but the first by a random count; or per row a
    ``(left, right)`` count of padded keys. ``strided``: q/k/v laid out as ``[B, T, H, D]`` transposes
    (what transformers' projections give) and a bank whose last dim is not unit-stride.
    """
    S = T if S is None else S

    def rand(*shape: int, swap: tuple[int, int]) -> torch.Tensor:
        if strided:
            layout = list(shape)
            layout[swap[0]], layout[swap[1]] = layout[swap[1]], layout[swap[0]]
            x = torch.randn(*layout, generator=generator).transpose(*swap)
        else:
            x = torch.randn(*shape, generator=generator)
        return (x * magnitude).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    q = rand(B, Hq, T, D, swap=(1, 2))
    k, v = rand(B, Hkv, S, D, swap=(1, 2)), rand(B, Hkv, S, D, swap=(1, 2))
    prefix_k, prefix_v = rand(N, Hkv, P, D, swap=(2, 3)), rand(N, Hkv, P, D, swap=(2, 3))
    options: dict = {"causal": causal}
    if prefix_index is not None:
        options["prefix_index"] = torch.tensor(prefix_index, device=device)
    if prefix_lens is not None:
        options["prefix_lens"] = torch.tensor(prefix_lens, device=device)
    if padding is not None:
        positions = torch.arange(S)[None, :]
        if isinstance(padding, str):
            lengths = torch.randint(0, S + 1, (B,), generator=generator)
            lengths[0] = S  # at least one unpadded row
            mask = positions >= (S - lengths)[:, None] if padding == "left" else positions < lengths[:, None]
        else:
            left, right = torch.tensor(padding).T
            mask = (positions >= left[:, None]) & (positions < S - right[:, None])
        options["key_padding_mask"] = mask.to(device)
    return Case(q, k, v, prefix_k, prefix_v, options)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, where equal infinities (an lse of ``-inf``) count as equal."""
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    diff = torch.where(both_inf, torch.zeros_like(expected, dtype=torch.float64), actual.double() - expected.double())
    return diff.abs().max().item() if diff.numel() else 0.0


def scale_of(expected: torch.Tensor) -> float:
    """``max(1, max |expected|)`` over the finite entries: what a tolerance of :data:`TOLERANCE` is relative to."""
    finite = expected[torch.isfinite(expected)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
