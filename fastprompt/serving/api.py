"""Public serving functions: register adapters and prompts on a model, export any registered prefix."""

from __future__ import annotations

import os
from typing import Any

import torch

from fastprompt.hf.registry import base_model_of
from fastprompt.hf.soft_prompts import leading_kv
from fastprompt.hf.state import adapter_registry
from fastprompt.methods import CACHED_PROMPT, ModelFit, Output
from fastprompt.methods.peft_format import read_adapter
from fastprompt.prefix.export import ExportedPrefix

__all__ = ["cache_prompt", "export_prefix_kv", "load_adapter", "load_prefix_kv"]


def load_adapter(model: Any, path: str | os.PathLike[str], name: str) -> None:
    """Register a prompt-learning adapter saved in PEFT's format under ``name`` on ``model``.

    Args:
        model: a ``transformers`` model or ``peft.PeftModel`` patched by :func:`fastprompt.patch`. Nothing is
            injected into it.
        path: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, as PEFT's
            ``save_pretrained`` writes, of any method in :mod:`fastprompt.methods`: prefix tuning (with or
            without projection; P-tuning v2), P-tuning (MLP or LSTM encoder) or prompt tuning.
        name: the name batch rows use for it; not ``"__base__"`` and not already used on ``model``.

    An adapter whose method yields K/V (prefix tuning) has them [L, 2, Hkv, P, D] formed here and stored once;
    one that yields virtual tokens (P-tuning, prompt tuning) has them run through the model once, at first use
    (causal models only).
    Raises ``ValueError`` naming what differs for an adapter of another model (layers, key/value heads, head
    size, hidden size), :class:`~fastprompt.UnsupportedModelError` for other adapter types or, for P-tuning
    / prompt tuning, a bidirectional model.
    """
    registry = adapter_registry(model)
    registry.check_new_name(name)
    saved = read_adapter(path, taker="load_adapter")
    base = base_model_of(model)
    saved.method.check_fits(saved.config, ModelFit.of(base), f"adapter {name!r} ({os.fspath(path)})", compiled=True)
    encoder = saved.encoder(base.device)
    if saved.method.output is Output.KV:
        # The K/V are fixed: keep them alone, not also the table they come from.
        with torch.no_grad():
            registry.add_kv(name, saved.method.produce(encoder, saved.config), saved.method.name)
    else:
        registry.add_encoder(name, encoder, saved.config, saved.method)


def cache_prompt(
    model: Any, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> None:
    """Run a fixed prompt once through the frozen model and register its per-layer K/V as the prefix ``name``.

    Args:
        model: a causal ``transformers`` model or ``peft.PeftModel`` patched by :func:`fastprompt.patch` (its
            base model runs, without any adapter), in eval mode.
        name: the name batch rows use for it; not ``"__base__"`` and not already used on ``model``.
        input_ids: [1, P] token ids, ``P >= 1`` (few-shot demonstrations, a system prompt).
        attention_mask: optional [1, P]; must be all ones (a cached prompt has no padding).

    A row that names the prompt then gives what it gives with the prompt's tokens in front of its own: its
    tokens are numbered from ``P`` (see :meth:`BatchPrefix.position_ids`).
    """
    registry = adapter_registry(model)
    registry.check_new_name(name)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor [1, P], got {_describe(input_ids)}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"cache_prompt takes one prompt, input_ids [1, P], got batch size {input_ids.shape[0]}")
    if input_ids.shape[1] == 0:
        raise ValueError("cache_prompt got a prompt with no tokens (input_ids of shape [1, 0])")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            raise ValueError(
                "cache_prompt got padding (zeros in attention_mask): a cached prompt is a run of real tokens; "
                "strip the padding from input_ids"
            )
    base = base_model_of(model)
    CACHED_PROMPT.check_fits(input_ids, ModelFit.of(base), f"cache_prompt({name!r})", compiled=True)
    registry.add_kv(name, leading_kv(base, CACHED_PROMPT, input_ids), CACHED_PROMPT.name)


def export_prefix_kv(model: Any, name: str) -> ExportedPrefix:
    """Any prefix ``model`` serves under ``name`` (a loaded or PEFT adapter, a compiled soft prompt, a cached
    prompt, a loaded export) as an :class:`~fastprompt.prefix.ExportedPrefix`: K/V [L, 2, Hkv, P, D]
    (detached, in the model's dtype), position offset ``P``, the model's geometry. ``.save(path)`` writes it."""
    registry = adapter_registry(model)
    if name == "__base__":
        raise ValueError("'__base__' names no prefix; there is nothing to export")
    kv = registry.kv(name).detach()
    return ExportedPrefix(kv=kv, position_offset=kv.shape[3], geometry=registry.geometry, kind=registry.kind(name))


def load_prefix_kv(model: Any, source: ExportedPrefix | str | os.PathLike[str], name: str) -> None:
    """Register an exported prefix (an :class:`~fastprompt.prefix.ExportedPrefix` or the path of a file its
    ``save`` wrote) under ``name`` on ``model``; ``ValueError`` naming what differs if it was made for a model
    of another geometry (layers, key/value heads, head size, model type)."""
    registry = adapter_registry(model)
    registry.check_new_name(name)
    exported = source if isinstance(source, ExportedPrefix) else ExportedPrefix.load(source)
    exported.check_fits(base_model_of(model).config)
    registry.add_kv(name, exported.kv, exported.kind)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
