"""Fused prompt encoders: PEFT's reparameterisation networks run once per forward, with autograd and caching.

Public function (:mod:`.api`) → autograd (:mod:`.autograd`: an ``autograd.Function`` for the MLP, a
``torch.library`` custom op with a fake for the LSTM layer) → backend (:mod:`.backends` declares them:
``fastprompt.kernels.prompt_encoders`` for triton, :mod:`.torch_backend` for PyTorch). Also here: PEFT's
encoder modules read as plans (:mod:`.peft_modules`) and the cache an owner keeps (:mod:`.cache`).
Nothing here imports from the layers above (prefix, hf, serving, cli).
"""

from fastprompt.encoders.api import encode_prompt, fused_lstm, fused_mlp
from fastprompt.encoders.backends import (
    ALIASES,
    ENCODER_BACKENDS,
    Alias,
    EncoderBackend,
    available_encoder_backends,
    resolve_encoder_backend,
)
from fastprompt.encoders.cache import EncoderCache
from fastprompt.encoders.peft_modules import prepare_encoders

__all__ = [
    "ALIASES",
    "ENCODER_BACKENDS",
    "Alias",
    "EncoderBackend",
    "EncoderCache",
    "available_encoder_backends",
    "encode_prompt",
    "fused_lstm",
    "fused_mlp",
    "prepare_encoders",
    "resolve_encoder_backend",
]
