"""The public prefix-attention function: the contract, its one validation, then :mod:`.dispatch`."""

from __future__ import annotations

import torch

from fastprompt.attention.args import AttentionArgs
from fastprompt.attention.dispatch import attend

__all__ = ["prefix_attention"]


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_index: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in which every query also sees a read-only block of prefix keys/values.

    ``out = softmax(scale * q @ [pk; k]^T + mask) @ [pv; v]``, without concatenating the prefix, copying
    it per batch row, or building a 4-D mask.

    Args:
        q: ``[B, Hq, T, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` keys and values of the sequence, ``S >= T`` (the first ``S - T`` are earlier
            tokens held in a KV cache). ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA): query head ``h``
            reads KV head ``h // (Hq // Hkv)``.
        prefix_k, prefix_v: ``[N, Hkv, P, D]`` a bank of ``N`` prefixes, read-only. ``P`` may be 0.
        prefix_index: ``[B]`` integer, the bank row each batch row uses, ``-1`` for none. ``None``: every row
            uses row 0 (then ``N`` must be 1).
        prefix_lens: ``[N]`` integer, the valid length (``<= P``) of each bank row. ``None``: all ``P``.
        key_padding_mask: ``[B, S]`` bool (or 0/1 integer), ``True`` for a real token.
        causal: over the sequence part, aligned bottom-right: query ``t`` sees keys ``s <= S - T + t``.
            Prefix columns are visible to every query of the row.
        scale: logit scale, default ``D ** -0.5``.
        dropout_p: attention dropout probability in ``[0, 1)`` (pass 0 in eval).
        return_lse: also return the log-sum-exp ``[B, Hq, T]`` float32 (for merging; differentiable).
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or ``"auto"``; ``None`` takes ``FASTPROMPT_BACKEND``
            (default ``auto``). A named backend that cannot run the call raises
            :class:`~fastprompt.errors.BackendUnavailableError` with every backend's reasons.
        check_values: check that ``prefix_index`` and ``prefix_lens`` are in range, which reads them (a
            device sync on CUDA). Callers that run many calls with the same index tensors (every layer
            of a model) check once with :func:`check_index_values` and pass ``False``. Never checked
            while compiling.

    Returns:
        ``out`` ``[B, Hq, T, D]`` in the dtype of ``q``, or ``(out, lse)``. A query with nothing to attend
        to gives zeros (and ``lse = -inf``). Gradients flow to ``q, k, v, prefix_k, prefix_v``; the prefix
        gradient is summed over the rows that used each bank row.
    """
    args = AttentionArgs(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, scale, dropout_p
    ).validated(check_values=check_values and not torch.compiler.is_compiling())
    return attend(args, backend=backend, return_lse=return_lse)
