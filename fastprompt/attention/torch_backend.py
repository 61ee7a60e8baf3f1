"""The ``torch`` backend: pure PyTorch, the readable statement of the op's semantics.

The prefix block and the sequence block are attended separately and merged by log-sum-exp, so the prefix
is never concatenated onto K/V and never copied once per batch row: the rows that use bank row ``n`` are
gathered (a copy of *queries*, not of the prefix) and multiplied against ``prefix_k[n]`` once.
Backward recomputes the forward under autograd. Implements the backend contract of
:mod:`fastprompt.attention.dispatch`.
"""

from __future__ import annotations

import torch

from fastprompt.attention.args import AttentionArgs
from fastprompt.attention.merge import merge_attention_states


def _keep_mask(
    generator: torch.Generator, shape: tuple[int, ...], dropout_p: float, device: torch.device
) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _softmax_block(
    logits: torch.Tensor, hidden: list[torch.Tensor], keep: torch.Tensor | None, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last dim: ``(probs, lse)``; rows with nothing visible give 0 and -inf.

    Written without ``logsumexp`` so that fully masked rows have finite gradients (zero), not NaN.
    """
    for mask in hidden:  # each True where a key is not visible, broadcast against logits
        logits = logits.masked_fill(mask, float("-inf"))
    row_max = logits.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - row_max)
    total = weights.sum(dim=-1)
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, torch.ones_like(total))
    probs = weights / safe_total[..., None]
    lse = torch.where(has_keys, row_max.squeeze(-1) + torch.log(safe_total), torch.full_like(total, float("-inf")))
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs, lse


def _attend(
    args: AttentionArgs,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable forward in float32 (float64 stays float64) in the five tensors given (the record's
    own, or their differentiable stand-ins); the rest comes from ``args``. Returns ``(out, lse)``."""
    B, Hq, T, D = q.shape
    N, Hkv, P, _ = prefix_k.shape
    S = k.shape[2]
    group = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # [B, Hkv, group * T, D]: the query heads of one KV head share its keys, so they become extra rows
    qg = q.to(compute).reshape(B, Hkv, group * T, D)
    t_of_row = torch.arange(T, device=q.device).repeat(group)

    causal, scale, dropout_p, key_padding_mask = args.causal, args.scale, args.dropout_p, args.key_padding_mask
    generator = None
    if dropout_p > 0:
        generator = torch.Generator(device=q.device).manual_seed(args.seed_value)

    logits = scale * qg @ k.to(compute).transpose(-1, -2)
    # Each mask stays in its own broadcastable shape ([group * T, S] causal, [B, 1, 1, S] padding).
    hidden = []
    if causal:
        hidden.append(torch.arange(S, device=q.device)[None, :] > (S - T + t_of_row)[:, None])
    if key_padding_mask is not None:
        hidden.append(~key_padding_mask[:, None, None, :])
    keep = None
    if generator is not None:
        keep = _keep_mask(generator, (B, Hq, T, S), dropout_p, q.device).reshape(B, Hkv, group * T, S)
    probs, seq_lse = _softmax_block(logits, hidden, keep, dropout_p)
    seq_out = probs @ v.to(compute)

    prefix_out = torch.zeros_like(seq_out)
    prefix_lse = torch.full_like(seq_lse, float("-inf"))
    prefix_keep = None
    if generator is not None and P > 0:
        prefix_keep = _keep_mask(generator, (B, Hq, T, P), dropout_p, q.device).reshape(B, Hkv, group * T, P)
    prefix_index = args.prefix_index
    if P == 0:
        used = []
    elif prefix_index is None:
        used = [0]
    else:
        used = torch.unique(prefix_index[prefix_index >= 0]).tolist()
    for n in used:
        # every row reads bank row 0 without an index: no gather of the queries, no scatter of the results
        rows = None if prefix_index is None else (prefix_index == n).nonzero().squeeze(1)
        R = B if rows is None else rows.numel()
        # The rows become extra query rows of one [Hkv, R * group * T, D] @ [Hkv, D, P] product: a
        # broadcast batch dimension would make matmul materialise the prefix once per row.
        q_rows = (qg if rows is None else qg[rows]).transpose(0, 1).reshape(Hkv, R * group * T, D)
        row_logits = scale * q_rows @ prefix_k[n].to(compute).transpose(-1, -2)
        row_hidden = []
        if args.prefix_lens is not None:
            row_hidden.append((torch.arange(P, device=q.device) >= args.prefix_lens[n])[None, None, :])
        row_keep = None
        if prefix_keep is not None:
            row_keep = (prefix_keep if rows is None else prefix_keep[rows]).transpose(0, 1).reshape(
                Hkv, R * group * T, P)
        row_probs, row_lse = _softmax_block(row_logits, row_hidden, row_keep, dropout_p)
        row_out = (row_probs @ prefix_v[n].to(compute)).reshape(Hkv, R, group * T, D).transpose(0, 1)
        row_lse = row_lse.reshape(Hkv, R, group * T).transpose(0, 1)
        if rows is None:
            prefix_out, prefix_lse = row_out, row_lse
        else:
            prefix_out = prefix_out.index_copy(0, rows, row_out)
            prefix_lse = prefix_lse.index_copy(0, rows, row_lse)

    out, lse = merge_attention_states(prefix_out, prefix_lse, seq_out, seq_lse)
    return out.reshape(B, Hq, T, D), lse.reshape(B, Hq, T)


def forward(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``."""
    with torch.no_grad():
        out, lse = _attend(args, args.q, args.k, args.v, args.prefix_k, args.prefix_v)
    return out.to(args.q.dtype), lse.float()


def backward(
    args: AttentionArgs,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` by recomputing the forward (``out``, ``lse`` unused)."""
    # A custom op's implementation runs below autograd, so the recompute is differentiated with
    # torch.func.vjp, which brings its own grad transform.
    inputs = (args.q, args.k, args.v, args.prefix_k, args.prefix_v)
    (recomputed, recomputed_lse), vjp = torch.func.vjp(lambda *x: _attend(args, *x), *inputs)
    # -inf lse entries (queries that see nothing) take no gradient
    lse_cotangent = torch.zeros_like(recomputed_lse) if grad_lse is None else grad_lse.to(recomputed_lse.dtype)
    lse_cotangent = torch.where(torch.isinf(recomputed_lse), 0, lse_cotangent)
    grads = vjp((grad_out.to(recomputed.dtype), lse_cotangent))
    return tuple(g.to(x.dtype) for g, x in zip(grads, inputs, strict=True))
