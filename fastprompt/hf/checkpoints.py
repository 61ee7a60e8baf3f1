"""Checkpoints that keep the prompt encoder: a training-time workaround for PEFT (checked with peft 0.21.2 and
transformers 5.24).

Prompt-learning checkpoints lose the prompt encoder. PEFT saves a prompt-learning adapter as one tensor,
``prompt_embeddings``: the encoder's *output* for its virtual tokens, [P, out_dim]
(``PeftModel.get_prompt_embedding_to_save``). That is enough to serve it: ``PeftModel.from_pretrained``
builds the adapter in inference mode, where the encoder is a plain table of that output. But
``PeftModel.load_adapter`` into an adapter that is training, which is what the ``Trainer`` calls for
``load_best_model_at_end=True`` and for ``resume_from_checkpoint``, copies the output into the encoder's
*input* table (``BasePromptEncoder._load_adapter_state_dict``):

- prefix tuning with projection: the input table is [P, token_dim], the output [P, layers * 2 * token_dim],
  so loading raises (the Trainer re-raises it as "load_best_model_at_end=True can lead to errors");
- P-tuning (MLP or LSTM encoder): both are [P, token_dim], so it loads without a word and the encoder then
  runs its MLP/LSTM on its own earlier output: other logits than the checkpoint loaded fresh;
- prefix tuning without projection and prompt tuning: the table is the output, so they load right.

And since the encoder's weights are in no file, no checkpoint of a reparameterised encoder can be resumed.

The fix, :func:`enable_encoder_checkpoints`, works on one model: its ``save_pretrained`` also writes the whole
state of every training prompt encoder next to PEFT's files (``fastprompt_prompt_encoder.safetensors``), and
its ``load_adapter`` loads that file into a training adapter's encoder when the checkpoint has one (PEFT's
path otherwise). PEFT's own files are unchanged, so ``PeftModel.from_pretrained`` reads the checkpoint as
before; the encoder state reproduces the saved output.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch

from fastprompt.hf.swaps import Swaps

__all__ = ["ENCODER_FILE", "disable_encoder_checkpoints", "enable_encoder_checkpoints", "encoder_checkpoints_enabled"]

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
