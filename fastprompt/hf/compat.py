"""Every name and behaviour of ``transformers`` and PEFT that differs between the supported versions.

fastprompt reads PEFT's adapters (configs, prompt encoders) and drives ``transformers``
models itself; whatever either library renamed between the tested floor (transformers 5.17, peft 0.18)
and the newest release is answered here, so the next rename is a change to this module only.

- transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name is
  deprecated until 5.40) and the model-output field likewise; :func:`cache_kwarg` names the argument a
  model takes and :func:`output_cache` reads either field.
- The mask-function names of ``transformers.masking_utils`` are imported here only.
- PEFT's attribute names for an adapter's pieces are read through the ``peft_*`` helpers.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

__all__ = [
    "AttentionMaskInterface",
    "bidirectional_mask_function",
    "cache_kwarg",
    "cache_layer_kv",
    "causal_mask_function",
    "forward_accepts",
    "is_peft_model",
    "new_dynamic_cache",
    "output_cache",
    "peft_active_config",
    "peft_prefix_cache",
    "peft_prompt_encoder",
    "position_rule",
]

_CACHE_NAMES = ("cache", "past_key_values")


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names ``name`` as a parameter (decorators that keep ``__wrapped__`` are seen
    through)."""
    return name in _forward_parameters(type(model))


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    # Read once per class: the patched forward asks on every call.
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument through which ``model`` takes a KV cache: ``"cache"`` from transformers 5.24 on,
    ``"past_key_values"`` before.

    Some task models (BERT's classifiers on 5.24) name neither and hand ``**kwargs`` to their backbone; then
    the backbone's name is the one.
    """
    for candidate in (model, getattr(model, "base_model", model)):
        for name in _CACHE_NAMES:
            if forward_accepts(candidate, name):
                return name
    raise ValueError(f"{type(model).__name__}.forward takes no KV cache argument (looked for {_CACHE_NAMES})")


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries under either name, or ``None``."""
    for name in _CACHE_NAMES:
        cache = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def new_dynamic_cache(config: Any) -> DynamicCache:
    """An empty :class:`~transformers.DynamicCache` for a model of ``config``."""
    return DynamicCache(config=config)


def cache_layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)``, each [B, Hkv, S, D], of a filled dynamic cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def position_rule(model: torch.nn.Module) -> tuple[int, int | None]:
    """``(first, padding)``: the position id of a sequence's first token, and the id the model gives padding
    (``None``: padding is numbered like any token).

    RoBERTa-style embeddings number tokens from ``padding_idx + 1`` and give padding ``padding_idx``
    (recognised by their ``create_position_ids_from_input_ids``); every other model numbers from 0.
    """
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        return embeddings.padding_idx + 1, embeddings.padding_idx
    return 0, None


def peft_prefix_cache(peft_model: Any, batch_size: int) -> DynamicCache:
    """A prefix-tuning adapter's K/V for ``batch_size`` rows as PEFT builds them (``get_prompt``), in a
    transformers cache: a ``DynamicCache`` as returned, or one filled from the legacy per-layer tuple."""
    prompt = peft_model.get_prompt(batch_size=batch_size)
    if isinstance(prompt, DynamicCache):
        return prompt
    cache = new_dynamic_cache(peft_model.get_base_model().config)
    for layer, (keys, values) in enumerate(prompt):
        cache.update(keys, values, layer)
    return cache


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``PeftModel`` (False without PEFT installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def peft_active_config(peft_model: Any, adapter_name: str | None = None) -> Any:
    """The PEFT config of ``adapter_name`` (default: the active adapter)."""
    return peft_model.peft_config[adapter_name or peft_model.active_adapter]


def peft_prompt_encoder(peft_model: Any, adapter_name: str) -> torch.nn.Module:
    """The prompt encoder (``PrefixEncoder``, ``PromptEncoder`` or ``PromptEmbedding``) of an adapter."""
    return peft_model.prompt_encoder[adapter_name]


