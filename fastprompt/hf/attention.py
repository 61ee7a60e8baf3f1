"""The ``transformers`` glue: a ``"fastprompt"`` attention function and mask function, and the prefix a
forward hands to them.

How a prefix reaches attention. The caller of a model forward passes a :class:`PrefixKV` as the keyword
argument ``fastprompt_prefix``; ``transformers`` v5 hands unknown forward kwargs down through the decoder
layers to the attention function, which picks the layer's block by ``module.layer_idx``. Nothing is stored
on the model or in a global, so two threads or two models never see each other's prefix, and gradient
checkpointing replays a layer with the same prefix it ran with.

Positions. Adapters are trained with the real tokens at positions ``P ..``: the model saw ``P`` cached
prefix tokens. A patched PEFT model passes explicit ``position_ids`` (see :mod:`fastprompt.hf.patching`).
:class:`PrefixCache` reports the ``P`` tokens in its length without holding them, so a plain model that is
given no ``position_ids`` numbers its tokens after the prefix too, while K and V hold the sequence only.

Masks. The mask function hands the 2-D padding mask through (or ``None`` when nothing is padded); the
attention function keeps its last ``S`` columns as the op's ``key_padding_mask``, so a mask that PEFT
widened with ``P`` leading ones works unchanged. Causality is the op's ``causal`` flag, aligned
bottom-right, which also covers decoding with a KV cache (``S > T``). No 4-D mask is ever built.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache

from fastprompt import attention
from fastprompt.errors import UnsupportedModelError
from fastprompt.hf.compat import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
from fastprompt.prefix.kv import PrefixKV

__all__ = [
    "ATTN_IMPLEMENTATION",
    "LAYER_LOG_KWARG",
    "PREFIX_KWARG",
    "PrefixCache",
    "fastprompt_attention",
    "fastprompt_mask",
]

ATTN_IMPLEMENTATION = "fastprompt"
PREFIX_KWARG = "fastprompt_prefix"
# A set the attention function adds each layer index to that read the prefix: lets the caller check that the
# prefix reached every attention layer (a model whose layers drop forward kwargs would silently skip it).
LAYER_LOG_KWARG = "fastprompt_layer_log"

# Attention-function kwargs whose non-default value changes the math in a way the op does not express.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias", "sinks")


class PrefixCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` that carries the prefix of a generation and never stores it.

    With ``count_prefix=True`` (the default), ``get_seq_length`` is ``P`` plus the stored length, so a model
    given no ``position_ids`` numbers its tokens after the prefix, and PEFT-style checks see what they see
    when the prefix sits in the cache; every row must then see the full ``P``. With ``count_prefix=False``
    the length is the stored tokens only, for callers that pass every row's positions themselves (a patched
    PEFT model's ``generate``): the generation then feeds the whole prompt on the first step on every
    transformers version, and rows may have no prefix or a shorter one. With ``store=False`` (a training
    forward) ``update`` keeps nothing and returns its inputs, so K and V are not copied into a cache that
    nobody reads.
    """

    def __init__(self, prefix: PrefixKV, *, store: bool, count_prefix: bool = True) -> None:
        if count_prefix and not prefix.every_row_has_full_length():
            raise ValueError(
                "PrefixCache numbers every row's tokens from the bank width P, but this bank has rows with no "
                "prefix (-1) or a prefix_lens below P; number each row from its own prefix length by passing "
                "position_ids to the forward (and count_prefix=False)"
            )
        super().__init__()
        self.prefix = prefix
        self.store = store
        self.count_prefix = count_prefix

    def get_seq_length(self, layer_idx: int = 0) -> int:
        stored = super().get_seq_length(layer_idx)
        return self.prefix.length + stored if self.count_prefix else stored

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.store:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def fastprompt_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``"fastprompt"`` mask function: the 2-D padding mask [B, W] (bool), or ``None`` if none is padded.

    Causal or bidirectional is the attention module's ``is_causal``; any other pattern (sliding window,
    packed sequences, overlays) cannot be expressed by the op and raises
    :class:`~fastprompt.UnsupportedModelError`.
    """
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        raise UnsupportedModelError(
            "fastprompt attention supports plain causal or bidirectional masks with padding; this forward asked "
            f"for another pattern ({getattr(mask_function, '__qualname__', mask_function)!r}: sliding window, "
            "packed sequences or a mask overlay)"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise UnsupportedModelError(f"expected a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.bool()
    # Dropping an all-true mask lets the kernels skip masking; the check syncs, so not while tracing.
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask


def _key_padding_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The last ``seq_len`` columns of a 2-D padding mask: the columns of the keys this call sees."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise UnsupportedModelError(
            f"fastprompt attention received a {attention_mask.dim()}-D attention mask of shape "
            f"{tuple(attention_mask.shape)}; it takes the 2-D padding mask [B, S] built by its own mask function "
            "(pass a 2-D attention_mask to the model, not a prepared 4-D one)"
        )
    if attention_mask.shape[1] < seq_len:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns but the keys have {seq_len} positions"
        )
    return attention_mask[:, attention_mask.shape[1] - seq_len :].bool()


def fastprompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"fastprompt"`` attention function registered with ``transformers.AttentionInterface``.

    query [B, Hq, T, D]; key, value [B, Hkv, S, D] (S - T tokens come from the KV cache, never the
    prefix); attention_mask: what :func:`fastprompt_mask` returned ([B, W] bool with W >= S, or None).
    The prefix, if any, is ``kwargs["fastprompt_prefix"]`` (a :class:`PrefixKV`). Returns the output as
    [B, T, Hq, D] and ``None`` for the attention weights, as the other attention functions do.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"fastprompt attention does not support {name}={kwargs[name]!r} "
                f"(from {type(module).__name__}); the op has no such term"
            )
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    prefix: PrefixKV | None = kwargs.get(PREFIX_KWARG)
    if prefix is None:
        batch, kv_heads, _, head_dim = key.shape
        prefix_k = prefix_v = key.new_empty(1, kv_heads, 0, head_dim)
        prefix_index = prefix_lens = None
    else:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} has no layer_idx, so the layer's prefix block cannot be found"
            )
        prefix_k, prefix_v = prefix.layer(layer_idx)
        layer_log = kwargs.get(LAYER_LOG_KWARG)
        if layer_log is not None:
            layer_log.add(layer_idx)
        if prefix_k.shape[1] != key.shape[1] or prefix_k.shape[3] != key.shape[3]:
            raise ValueError(
                f"layer {layer_idx}: prefix blocks are [N, {prefix_k.shape[1]}, P, {prefix_k.shape[3]}] but the "
                f"layer's keys have {key.shape[1]} heads of size {key.shape[3]}"
            )
        if prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
        prefix_index, prefix_lens = prefix.prefix_index, prefix.prefix_lens
    out = attention.prefix_attention(
        query,
        key,
        value,
        prefix_k,
        prefix_v,
        prefix_index=prefix_index,
        prefix_lens=prefix_lens,
        key_padding_mask=_key_padding_mask(attention_mask, key.shape[2]),
        causal=causal,
        scale=scaling,
        dropout_p=dropout,
        check_values=False,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, fastprompt_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastprompt_mask)
