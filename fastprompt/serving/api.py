"""Public serving functions: register adapters and prompts on a model, export any registered prefix."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from fastprompt.errors import UnsupportedModelError
from fastprompt.hf.adapters import adapter_registry, base_model_of
from fastprompt.hf.soft_prompts import check_causal, prompt_kv
from fastprompt.prefix.bank import KVGeometry
from fastprompt.prefix.export import ExportedPrefix
from fastprompt.prefix.peft import PREFIX_TYPES, SOFT_PROMPT_TYPES, build_prompt_encoder, peft_type, prefix_tuning_kv

__all__ = ["cache_prompt", "export_prefix_kv", "load_adapter", "load_prefix_kv"]

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_WEIGHTS_KEY = "prompt_embeddings"


def _read_peft_adapter(path: str | os.PathLike[str]) -> tuple[Any, torch.Tensor]:
    """(PEFT config, ``prompt_embeddings`` [P, out_dim]) of an adapter saved by PEFT's ``save_pretrained``."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    folder = os.fspath(path)
    config_file, weights_file = os.path.join(folder, _CONFIG_FILE), os.path.join(folder, _WEIGHTS_FILE)
    for needed in (config_file, weights_file):
        if not os.path.isfile(needed):
            raise FileNotFoundError(
                f"{folder} is not a PEFT adapter folder: {os.path.basename(needed)} is missing (PEFT's format is "
                f"{_CONFIG_FILE} + {_WEIGHTS_FILE})"
            )
    with open(config_file, encoding="utf-8") as f:
        kind = json.load(f).get("peft_type")
    if kind not in PREFIX_TYPES + SOFT_PROMPT_TYPES:
        raise UnsupportedModelError(
            f"the adapter in {folder} is {kind}; load_adapter takes prompt-learning adapters "
            f"({', '.join(PREFIX_TYPES + SOFT_PROMPT_TYPES)})"
        )
    config = PeftConfig.from_pretrained(folder)
    weights = load_file(weights_file)
    if _WEIGHTS_KEY not in weights:
        raise ValueError(f"{weights_file} holds {sorted(weights)}, not PEFT's {_WEIGHTS_KEY!r} tensor")
    return config, weights[_WEIGHTS_KEY]


def _check_adapter_fits(config: Any, base: Any, name: str, folder: str) -> None:
    model = KVGeometry.from_config(base.config)
    if peft_type(config) in PREFIX_TYPES:
        heads = config.num_attention_heads
        adapter = KVGeometry(config.num_layers, heads, config.token_dim // heads)
        problem = adapter.mismatch(model)
        if problem is not None:
            raise ValueError(
                f"adapter {name!r} ({folder}) was made for a model with {adapter.describe()}, which does not fit this "
                f"model ({model.describe()}): {problem}"
            )
        return
    hidden = base.get_input_embeddings().embedding_dim
    if config.token_dim != hidden:
        raise ValueError(
            f"adapter {name!r} ({folder}) has virtual tokens of hidden size {config.token_dim} but this model's "
            f"input embeddings have hidden size {hidden}"
        )
    check_causal(base, f"the {peft_type(config)} adapter {name!r} (compiled to keys and values once)")


def load_adapter(model: Any, path: str | os.PathLike[str], name: str) -> None:
    """Register a prompt-learning adapter saved in PEFT's format under ``name`` on ``model``.

    Args:
        model: a ``transformers`` model or ``peft.PeftModel`` patched by :func:`fastprompt.patch`. Nothing is
            injected into it.
        path: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, as PEFT's
            ``save_pretrained`` writes: PREFIX_TUNING (with or without projection; P-tuning v2), P_TUNING
            (MLP or LSTM encoder) or PROMPT_TUNING.
        name: the name batch rows use for it; not ``"__base__"`` and not already used on ``model``.

    A prefix-tuning adapter's K/V [L, 2, Hkv, P, D] are formed here (and stored once); a P-tuning or
    prompt-tuning adapter's virtual tokens run through the model once, at first use (causal models only).
    Raises ``ValueError`` naming what differs for an adapter of another model (layers, key/value heads, head
    size, hidden size), :class:`~fastprompt.UnsupportedModelError` for other adapter types or, for P-tuning
    / prompt tuning, a bidirectional model.
    """
    registry = adapter_registry(model)
    registry.check_new_name(name)
    config, prompt_embeddings = _read_peft_adapter(path)
    base = base_model_of(model)
    _check_adapter_fits(config, base, name, os.fspath(path))
    encoder = build_prompt_encoder(config, prompt_embeddings.to(base.device))
    if peft_type(config) in PREFIX_TYPES:
        # The K/V are fixed: keep them alone, not also the table they come from.
        with torch.no_grad():
            registry.add_kv(name, prefix_tuning_kv(encoder, config), "prefix_tuning")
    else:
        registry.add_encoder(name, encoder, config)


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
    check_causal(base, f"cache_prompt({name!r})")
    registry.add_kv(name, prompt_kv(base, input_ids=input_ids.to(base.device)), "cached_prompt")


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
