"""Tokens that come first in every row, run once through the frozen model: their per-layer K/V are a prefix.

On a causal model, tokens at the front of a row attend only to each other, so their keys and values are the
same in every row of every batch: a fixed prompt (few-shot demonstrations, a system prompt) or the virtual
tokens of a P-tuning / prompt-tuning adapter can run once, batch 1, at positions ``0 .. P - 1``, and every row
then reads their K/V as a read-only prefix, its own tokens numbered from ``P``. On a bidirectional encoder
(BERT) the front tokens also attend to the tokens after them, so their K/V depend on each row: refused.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from fastprompt.hf import compat
from fastprompt.methods import Output, PromptMethod, require_causal

__all__ = ["leading_kv", "prompt_kv"]


def prompt_kv(
    base: PreTrainedModel, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-layer K/V [L, 2, Hkv, P, D] of ``P`` leading tokens, run once through ``base``'s backbone.

    Args:
        base: a causal ``transformers`` model in eval mode (its backbone runs, not its head), without any prefix.
        input_ids: [1, P] token ids; or ``inputs_embeds``: [1, P, hidden] input embeddings (virtual tokens).

    The tokens sit at positions ``0 .. P - 1``; keys are stored as the model's attention produced them (after
    its rotary embedding, if any), as a KV cache would hold them. No gradient is recorded.
    """
    require_causal(base, "computing a prompt's keys and values once")
    if base.training:
        raise ValueError(
            "a prompt's keys and values are computed once and reused, so the model must be in eval mode (call "
            "model.eval()): in training mode dropout noise would be stored with them"
        )
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None or (input_ids is not None and inputs_embeds is not None):
        raise ValueError("pass exactly one of input_ids [1, P] and inputs_embeds [1, P, hidden]")
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    cache = compat.new_dynamic_cache(base.config)
    inputs: dict[str, Any] = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "position_ids": positions,
                              "use_cache": True, compat.cache_kwarg(base.base_model): cache}
    with torch.no_grad():
        base.base_model(**inputs)
    return torch.stack([torch.stack(kv) for kv in compat.cache_layer_kv(cache)])[:, :, 0]


def leading_kv(base: PreTrainedModel, method: PromptMethod, produced: torch.Tensor) -> torch.Tensor:
    """What ``method`` produced as a prefix block [L, 2, Hkv, P, D] in ``base``'s dtype.

    Keys and values are taken as they are; virtual-token embeddings [P, hidden] or token ids [1, P] run once
    through ``base`` (see :func:`prompt_kv`). No gradient is recorded for those.
    """
    if method.output is Output.KV:
        return produced.to(base.dtype)
    if method.output is Output.EMBEDDINGS:
        return prompt_kv(base, inputs_embeds=produced[None].to(device=base.device, dtype=base.dtype))
    return prompt_kv(base, input_ids=produced.to(base.device))
