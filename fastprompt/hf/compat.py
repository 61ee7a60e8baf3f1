"""Every name and behaviour of ``transformers`` and PEFT that differs between the supported versions.

fastprompt reads PEFT's adapters (configs, prompt encoders) and drives ``transformers``
models itself; whatever either library renamed between the tested floor (transformers 5.17, peft 0.18)
and the newest release is answered here, so the next rename is a change to this module only.

- transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name is
  deprecated until 5.40) and the model-output field likewise; :func:`cache_kwarg` names the argument a
  model takes and :func:`output_cache` reads either field.
- The mask-function names of ``transformers.masking_utils`` are imported here only.
- PEFT's attribute names for an adapter's pieces are read through the ``peft_*`` helpers.
- PEFT's prompt-learning checkpoints lose the prompt encoder: :func:`enable_encoder_checkpoints` (below).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

from fastprompt.hf.swaps import Swaps

__all__ = [
    "ENCODER_FILE",
    "disable_encoder_checkpoints",
    "enable_encoder_checkpoints",
    "encoder_checkpoints_enabled",
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


# ---------------------------------------------------------------------------------------------------
# Checkpoints that keep the prompt encoder
#
# Training-time workarounds for PEFT (checked with peft 0.21.2 and transformers 5.24).
#
# Prompt-learning checkpoints lose the prompt encoder. PEFT saves a prompt-learning adapter as one tensor,
# ``prompt_embeddings``: the encoder's *output* for its virtual tokens, [P, out_dim]
# (``PeftModel.get_prompt_embedding_to_save``). That is enough to serve it: ``PeftModel.from_pretrained``
# builds the adapter in inference mode, where the encoder is a plain table of that output. But
# ``PeftModel.load_adapter`` into an adapter that is training, which is what the ``Trainer`` calls for
# ``load_best_model_at_end=True`` and for ``resume_from_checkpoint``, copies the output into the encoder's
# *input* table (``BasePromptEncoder._load_adapter_state_dict``):
#
# - prefix tuning with projection: the input table is [P, token_dim], the output [P, layers * 2 * token_dim],
#   so loading raises (the Trainer re-raises it as "load_best_model_at_end=True can lead to errors");
# - P-tuning (MLP or LSTM encoder): both are [P, token_dim], so it loads without a word and the encoder then
#   runs its MLP/LSTM on its own earlier output: other logits than the checkpoint loaded fresh;
# - prefix tuning without projection and prompt tuning: the table is the output, so they load right.
#
# And since the encoder's weights are in no file, no checkpoint of a reparameterised encoder can be resumed.
#
# :func:`enable_encoder_checkpoints` fixes both on one model: its ``save_pretrained`` also writes the whole
# state of every training prompt encoder next to PEFT's files (``fastprompt_prompt_encoder.safetensors``), and
# its ``load_adapter`` loads that file into a training adapter's encoder when the checkpoint has one (PEFT's
# path otherwise). PEFT's own files are unchanged, so ``PeftModel.from_pretrained`` reads the checkpoint as
# before; the encoder state reproduces the saved output.
# ---------------------------------------------------------------------------------------------------
ENCODER_FILE = "fastprompt_prompt_encoder.safetensors"
_CHECKPOINTS_ATTR = "_fastprompt_encoder_checkpoints"


@dataclass
class _CheckpointState:
    swaps: Swaps = field(default_factory=Swaps)  # save_pretrained and load_adapter, wrapped


def _training_prompt_adapter(model: Any, adapter_name: str) -> bool:
    config = model.peft_config.get(adapter_name)
    return config is not None and config.is_prompt_learning and not config.inference_mode


def _adapter_folder(directory: str, adapter_name: str) -> str:
    # PEFT's layout: the adapter "default" at the top, any other in a subfolder of its name
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _save_pretrained(model: Any, original: Any, save_directory: str, *args: Any, **kwargs: Any) -> Any:
    result = original(save_directory, *args, **kwargs)
    call = inspect.signature(original).bind(save_directory, *args, **kwargs)
    call.apply_defaults()
    if not call.arguments["is_main_process"]:
        return result
    for name in call.arguments["selected_adapters"] or list(model.peft_config):
        if _training_prompt_adapter(model, name):
            encoder = model.prompt_encoder[name]
            state = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()}
            safetensors.torch.save_file(state, os.path.join(_adapter_folder(save_directory, name), ENCODER_FILE))
    return result


def _load_adapter(model: Any, original: Any, model_id: str | os.PathLike, adapter_name: str, *args: Any,
                  **kwargs: Any) -> Any:
    path = os.path.join(model_id, ENCODER_FILE)
    if not (_training_prompt_adapter(model, adapter_name) and os.path.isfile(path)):
        return original(model_id, adapter_name, *args, **kwargs)
    encoder = model.prompt_encoder[adapter_name]
    # copied in place: the parameters the optimizer holds stay the ones that train
    return encoder.load_state_dict(safetensors.torch.load_file(path), strict=True)


def enable_encoder_checkpoints(model: Any) -> Any:
    """Make ``model``'s checkpoints keep its prompt encoders, so that loading one into the training model
    (``Trainer``'s ``load_best_model_at_end=True`` and ``resume_from_checkpoint``) restores exactly what
    was saved. In place; returns ``model``; calling it twice is harmless.

    ``model``: a ``peft.PeftModel`` (patched by :func:`fastprompt.patch` or not). Its ``save_pretrained``
    also writes :data:`ENCODER_FILE` (every parameter of each training prompt-learning adapter's encoder)
    beside PEFT's files, and its ``load_adapter`` loads that file into an existing training adapter when
    the checkpoint has one. See the module docstring for what PEFT does without it.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"enable_encoder_checkpoints takes a peft.PeftModel, got {type(model).__name__}")
    if model.__dict__.get(_CHECKPOINTS_ATTR) is not None:
        return model
    state = _CheckpointState()
    for name, wrapper in (("save_pretrained", _save_pretrained), ("load_adapter", _load_adapter)):
        state.swaps.wrap(model, name, wrapper)
    object.__setattr__(model, _CHECKPOINTS_ATTR, state)
    return model


def encoder_checkpoints_enabled(model: Any) -> bool:
    """Whether :func:`enable_encoder_checkpoints` is in effect on ``model``."""
    return model.__dict__.get(_CHECKPOINTS_ATTR) is not None


def disable_encoder_checkpoints(model: Any) -> Any:
    """Undo :func:`enable_encoder_checkpoints`; a no-op if it was not enabled. Returns ``model``."""
    state: _CheckpointState | None = model.__dict__.pop(_CHECKPOINTS_ATTR, None)
    if state is None:
        return model
    state.swaps.restore()
    return model
