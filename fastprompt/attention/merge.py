"""Merging attention states: the one operator that joins attention over disjoint key sets."""

from __future__ import annotations

import torch


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A ∪ B from attention over A and over B (disjoint key sets).

    Args:
        out_a, out_b: ``[..., T, D]`` attention outputs over key sets A and B.
        lse_a, lse_b: ``[..., T]`` their log-sum-exp of the scaled logits; ``-inf`` where a query saw
            no key of that set (its ``out`` is then ignored).

    Returns:
        ``(out, lse)``: ``out`` ``[..., T, D]`` in the dtype of ``out_a``, ``lse`` ``[..., T]`` float32
        (float64 for float64 inputs). A query that saw no key in either set gets ``out = 0`` and
        ``lse = -inf``. Differentiable.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have the same shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if out_a.dtype != out_b.dtype or out_a.device != out_b.device or lse_a.device != out_a.device:
        raise ValueError(
            f"out_a and out_b must share dtype and device with each other and with the lse tensors, got "
            f"{out_a.dtype} on {out_a.device}, {out_b.dtype} on {out_b.device}, lse on {lse_a.device}"
        )
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"lse_a and lse_b must have shape {tuple(out_a.shape[:-1])} (out without its last dim), "
            f"got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}"
        )
    compute = torch.float64 if torch.float64 in (out_a.dtype, lse_a.dtype) else torch.float32
    lse_a, lse_b = lse_a.to(compute), lse_b.to(compute)
    lse_max = torch.maximum(lse_a, lse_b)
    finite_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w_a = torch.exp(lse_a - finite_max)
    w_b = torch.exp(lse_b - finite_max)
    total = w_a + w_b
    # Guarded so that queries with no key anywhere get zero gradients rather than NaN.
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, torch.ones_like(total))
    out = (w_a[..., None] * out_a.to(compute) + w_b[..., None] * out_b.to(compute)) / safe_total[..., None]
    lse = torch.where(has_keys, finite_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return out.to(out_a.dtype), lse
