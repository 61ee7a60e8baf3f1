"""The ``cpu`` backend's cascade: ATen's CPU flash attention over the sequence, then the C++ kernel over the
prefix, resuming from the flash kernel's state (FlashInfer's cascade, on the CPU).

The sequence part is what ``scaled_dot_product_attention`` runs without a prefix, so a call pays that plus
the prefix part. An output and its log-sum-exp are a state of the online softmax (running max = lse, sum =
1, accumulator = output), so the C++ kernel starts from the flash kernel's and attends the prefix keys
only: the merge costs nothing extra, rows sharing a bank row are attended together, and the prefix is read
in place. Backward is the same split: given the whole attention's ``out`` and ``lse``, each part's
probabilities are ``exp(logit - lse)`` and ``delta = rowsum(dO * out)``, so ATen's flash backward of the
sequence part and the kernel's backward over the prefix keys (adding to the flash kernel's ``dq`` and summing
the prefix gradient over the rows that use it) give exactly the gradients of the whole softmax.

The cascade pays for itself only where ATen's kernel beats the C++ kernel over the sequence: on long
bidirectional rows. :func:`runs_forward` and :func:`runs_backward` say where, from the thresholds below;
:mod:`fastprompt.attention.cpu_backend` sends every other call to the C++ kernels alone (as it does calls with
dropout, which ATen's CPU flash kernel lacks, and backward calls with a gradient reaching the lse, which its
flash backward cannot take, or in float64, whose gradients the float32 lse would cap at ~1e-7 relative
error). The kernels must be loaded before these functions run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastprompt.attention.args import AttentionArgs

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# Where each route is faster, measured side by side on a 2-core Xeon (AVX-512, MKL), float32, 2 threads
# (benchmarks/results/cpu-2026-12-03-cpu-routes.md). The C++ kernel reads each K/V block once for the query heads
# of a GQA group and skips the blocks a causal mask hides; ATen's flash kernel runs larger blocks, which pays on
# long bidirectional rows of few heads per group.
FORWARD_MIN_KEYS = 256
"""Forward: the cascade for bidirectional calls with at least this many sequence keys; causal: the C++ kernel."""
BACKWARD_MIN_KEYS = 1024
"""Backward: the cascade for bidirectional calls with at least this many sequence keys."""
DECODE_MAX_GROUP = 1
"""Decode steps (one query per row): the cascade only for GQA groups of at most this many query heads..."""
DECODE_MIN_KEYS = 8192
"""...and at least this many sequence keys in the whole batch (B * S)."""


def runs_forward(args: AttentionArgs) -> bool:
    """Whether the cascade is the faster forward for this call's shapes (dropout aside)."""
    B, Hq, T = args.q.shape[:3]
    S = args.k.shape[2]
    if T == 1:
        return Hq // args.k.shape[1] <= DECODE_MAX_GROUP and B * S >= DECODE_MIN_KEYS
    return not args.causal and S >= FORWARD_MIN_KEYS


def runs_backward(args: AttentionArgs) -> bool:
    """Whether the cascade is the faster backward for this call's shapes (dropout, lse gradient, dtype aside)."""
    return not args.causal and args.k.shape[2] >= BACKWARD_MIN_KEYS


class _Sequence(NamedTuple):
    """How ATen's flash kernel runs the sequence part of a call."""

    causal: bool  # its causal mask is aligned top-left, which is ours only when S == T
    mask: torch.Tensor | None  # additive, in q's dtype: [B or 1, 1, T or 1, S]
    empty: torch.Tensor | None  # [B, 1, T] bool: queries that see no sequence key (ATen gives them lse 0)


def _sequence(args: AttentionArgs) -> _Sequence:
    q, kpm = args.q, args.key_padding_mask
    T, S = q.shape[2], args.k.shape[2]
    causal = args.causal and T > 1  # a single query sees every key of its row
    mask = None
    if causal and S > T:
        positions = torch.arange(S, device=q.device)
        hidden = positions[None, :] > (S - T + torch.arange(T, device=q.device))[:, None]
        mask = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))[None, None]
        causal = False
    empty = None
    if kpm is not None:
        padding = torch.zeros(kpm.shape, dtype=q.dtype, device=q.device).masked_fill_(~kpm, float("-inf"))
        mask = padding[:, None, None, :] if mask is None else mask + padding[:, None, None, :]
        if args.causal:
            seen = kpm.cumsum(-1) > 0  # [B, S]: a real key at or before s
            empty = ~seen[:, S - T + torch.arange(T, device=q.device)]
        else:
            empty = ~kpm.any(-1, keepdim=True).expand(-1, T)
        empty = empty[:, None, :]
    return _Sequence(causal, mask, empty)


def forward(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``; no dropout."""
    seq = _sequence(args)
    out, lse = _flash(args.q, args.k, args.v, 0.0, seq.causal, attn_mask=seq.mask, scale=args.scale)
    if seq.empty is not None:
        lse = lse.masked_fill(seq.empty, float("-inf"))
    return torch.ops.fastprompt.prefix_attention_resume_fwd_cpu(out, lse, *args.flat())


def backward(
    args: AttentionArgs, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` from the whole attention's ``out`` and ``lse``; no dropout, no
    gradient reaching the lse, not float64 (whose gradients need an lse more precise than the float32 one)."""
    seq = _sequence(args)
    # Queries that see no key at all: an lse of +inf makes every probability exp(logit - lse) zero.
    flash_lse = torch.where(torch.isinf(lse), float("inf"), lse)
    dq, dk, dv = _flash_backward(
        grad_out, args.q, args.k, args.v, out, flash_lse, 0.0, seq.causal, attn_mask=seq.mask, scale=args.scale
    )
    dq, dprefix_k, dprefix_v = torch.ops.fastprompt.prefix_attention_resume_bwd_cpu(
        grad_out, out, lse, dq, *args.flat()
    )
    return dq, dk, dv, dprefix_k, dprefix_v
