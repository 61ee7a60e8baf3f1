"""The PEFT reader: which method a PEFT config is, and a prompt-learning adapter as PEFT saves it.

PEFT saves a prompt-learning adapter as ``adapter_config.json`` plus ``adapter_model.safetensors`` holding one
tensor, ``prompt_embeddings`` [P, out_dim]: the encoder's output for its virtual tokens. That on-disk format is
PEFT's and stays so; this module is the only place that reads a config's ``peft_type``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastprompt.errors import UnsupportedModelError
from fastprompt.methods import METHODS, PromptMethod

__all__ = ["SavedAdapter", "is_prompt_learning", "method_of", "read_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_WEIGHTS_KEY = "prompt_embeddings"
_BY_PEFT_TYPE = {method.peft_type: method for method in METHODS if method.peft_type is not None}


def _peft_type(config: Any) -> str:
    """``"PREFIX_TUNING"``, ``"LORA"``, ... of a PEFT config (its enum's value) or of its JSON dict."""
    kind = config.get("peft_type") if isinstance(config, dict) else config.peft_type
    return getattr(kind, "value", kind)


def is_prompt_learning(config: Any) -> bool:
    """Whether a PEFT config is of a method in the table."""
    return _peft_type(config) in _BY_PEFT_TYPE


def method_of(config: Any, what: str = "the adapter", taker: str = "fastprompt") -> PromptMethod:
    """The method of a PEFT config; :class:`~fastprompt.UnsupportedModelError` for any other PEFT type.

    ``what`` and ``taker`` word the error: "{what} is LORA; {taker} takes prompt-learning adapters (...)".
    """
    kind = _peft_type(config)
    method = _BY_PEFT_TYPE.get(kind)
    if method is None:
        raise UnsupportedModelError(
            f"{what} is {kind}; {taker} takes prompt-learning adapters ({', '.join(_BY_PEFT_TYPE)})"
        )
    return method


@dataclass(frozen=True)
class SavedAdapter:
    """A prompt-learning adapter read from PEFT's files: its method, PEFT config and ``prompt_embeddings``
    [P, out_dim]."""

    method: PromptMethod
    config: Any
    prompt_embeddings: torch.Tensor

    def encoder(self, device: torch.device | str) -> torch.nn.Module:
        """PEFT's inference-mode encoder holding the saved output, on ``device``."""
        return self.method.build_encoder(self.config, self.prompt_embeddings.to(device))


def read_adapter(path: str | os.PathLike[str], taker: str = "fastprompt") -> SavedAdapter:
    """Read the adapter PEFT's ``save_pretrained`` wrote into the folder ``path``.

    Raises ``FileNotFoundError`` naming a missing file, :class:`~fastprompt.UnsupportedModelError` for an
    adapter of another kind (``taker`` names who refuses it), ``ValueError`` for weights without
    ``prompt_embeddings``.
    """
    from peft import PeftConfig
    from safetensors.torch import load_file

    folder = os.fspath(path)
    config_file, weights_file = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for needed in (config_file, weights_file):
        if not os.path.isfile(needed):
            raise FileNotFoundError(
                f"{folder} is not a PEFT adapter folder: {os.path.basename(needed)} is missing (PEFT's format is "
                f"{CONFIG_FILE} + {WEIGHTS_FILE})"
            )
    with open(config_file, encoding="utf-8") as f:
        method = method_of(json.load(f), f"the adapter in {folder}", taker)
    config = PeftConfig.from_pretrained(folder)
    weights = load_file(weights_file)
    if _WEIGHTS_KEY not in weights:
        raise ValueError(f"{weights_file} holds {sorted(weights)}, not PEFT's {_WEIGHTS_KEY!r} tensor")
    return SavedAdapter(method, config, weights[_WEIGHTS_KEY])
