"""The naive path: what PEFT does today, kept in one place.

PEFT expands the prefix to every batch row, concatenates it in front of K and V (through the KV cache)
and hands SDPA a 4-D mask that covers prefix and sequence. This module states that path once and is
used twice:

- :func:`naive_prefix_attention` is the benchmark baseline (input dtype, SDPA);
- :func:`reference_prefix_attention` is the test oracle: the same concatenation and mask in float64
  with an explicit softmax, so that rows with nothing to attend to come out as zeros, not NaN.

Shapes follow :func:`fastprompt.prefix_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.attention.args import AttentionArgs


def _expand_and_concat(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated keys/values with GQA heads repeated, and the 4-D visibility mask.

    Returns ``k_all, v_all`` of shape [B, Hq, P + S, D] and ``visible`` [B, 1, T, P + S] (bool).
    """
    q, k, v, prefix_k, prefix_v = args.inputs
    prefix_index, prefix_lens = args.prefix_index, args.prefix_lens
    B, Hq, T, _ = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    N, _, P, _ = prefix_k.shape
    device = q.device
    if prefix_index is None:
        prefix_index = torch.zeros(B, dtype=torch.long, device=device)
    prefix_index = prefix_index.long()
    if prefix_lens is None:
        prefix_lens = torch.full((N,), P, dtype=torch.long, device=device)
    rows = prefix_index.clamp(min=0)
    pk = prefix_k[rows]  # the per-row copy PEFT makes
    pv = prefix_v[rows]
    k_all = torch.cat([pk, k], dim=2)
    v_all = torch.cat([pv, v], dim=2)
    group = Hq // Hkv
    k_all = k_all.repeat_interleave(group, dim=1)
    v_all = v_all.repeat_interleave(group, dim=1)

    row_len = torch.where(prefix_index >= 0, prefix_lens.long()[rows], torch.zeros_like(rows))
    prefix_visible = torch.arange(P, device=device)[None, :] < row_len[:, None]  # [B, P]
    prefix_visible = prefix_visible[:, None, None, :].expand(B, 1, T, P)
    seq_visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=device)
    if args.causal:
        t = torch.arange(T, device=device)[:, None]
        s = torch.arange(S, device=device)[None, :]
        seq_visible = seq_visible & (s <= S - T + t)
    if args.key_padding_mask is not None:
        seq_visible = seq_visible & args.key_padding_mask.bool()[:, None, None, :]
    visible = torch.cat([prefix_visible, seq_visible], dim=3)
    return k_all, v_all, visible


def naive_prefix_attention(args: AttentionArgs) -> torch.Tensor:
    """PEFT's path: expand the prefix per row, ``torch.cat`` onto K/V, SDPA with a 4-D mask.

    Takes the op's arguments as a record (raw or validated) and gives the result of
    :func:`fastprompt.prefix_attention` (the benchmark baseline). Rows with nothing to attend to give
    whatever SDPA gives (NaN on some backends), as in PEFT.
    """
    k_all, v_all, visible = _expand_and_concat(args)
    return F.scaled_dot_product_attention(
        args.q, k_all, v_all, attn_mask=visible, dropout_p=args.dropout_p, scale=args.scale
    )


def reference_prefix_attention(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle: returns ``(out, lse)``, out [B, Hq, T, D] float64, lse [B, Hq, T] float64.

    Takes the op's arguments as a record (raw or validated; dropout is ignored). Differentiable
    (gradients reach all five tensors). Queries with no visible key give ``out = 0`` and ``lse = -inf``.
    """
    args = args.with_inputs([x.to(torch.float64) for x in args.inputs])
    k_all, v_all, visible = _expand_and_concat(args)
    q = args.q
    scale = q.shape[-1] ** -0.5 if args.scale is None else args.scale
    logits = scale * q @ k_all.transpose(-1, -2)
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isinf(lse)
    probs = torch.exp(logits - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    out = probs @ v_all
    return out, lse
