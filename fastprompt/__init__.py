"""fastprompt: fused kernels for prompt-based tuning on Hugging Face transformers.

Public API (imported lazily, so ``import fastprompt`` stays cheap and pulls in neither triton nor the
C++ build)::

    fastprompt.prefix_attention(q, k, v, prefix_k, prefix_v, ...)   # the op
    fastprompt.merge_attention_states(out_a, lse_a, out_b, lse_b)   # merge partial attention by LSE
    fastprompt.patch(model) / fastprompt.unpatch(model)              # transformers / PEFT integration
    fastprompt.encode_prompt(encoder, tokens)                        # fused prompt encoders, once per forward
    fastprompt.PromptTemplate / PromptTemplateModel                  # P-tuning with prompts anywhere
    fastprompt.shard_prompt_model(model) / save_sharded_adapter(...)  # FSDP for a patched model
    fastprompt.enable_encoder_checkpoints(model)                     # Trainer checkpoints keep the encoder
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastprompt.errors import BackendUnavailableError, UnsupportedModelError

__version__ = "0.1.0"

_LAZY = {
    "prefix_attention": "fastprompt.ops",
    "merge_attention_states": "fastprompt.ops",
    "available_backends": "fastprompt.ops",
    "resolve_backend": "fastprompt.ops",
    "patch": "fastprompt.patching",
    "unpatch": "fastprompt.patching",
    "encode_prompt": "fastprompt.encoders",
    "clear_encoder_cache": "fastprompt.encoders",
    "fused_mlp": "fastprompt.encoders",
    "fused_lstm": "fastprompt.encoders",
    "PromptTemplate": "fastprompt.templates",
    "PromptTemplateModel": "fastprompt.templates",
    "scatter_prompts": "fastprompt.templates",
    "PrefixKV": "fastprompt.integration",
    "PrefixCache": "fastprompt.integration",
    "shard_prompt_model": "fastprompt.distributed",
    "save_sharded_adapter": "fastprompt.distributed",
    "enable_encoder_checkpoints": "fastprompt.compat_training",
    "disable_encoder_checkpoints": "fastprompt.compat_training",
}

__all__ = ["BackendUnavailableError", "UnsupportedModelError", "__version__", *_LAZY]

if TYPE_CHECKING:
    from fastprompt.compat_training import disable_encoder_checkpoints, enable_encoder_checkpoints  # noqa: F401
    from fastprompt.distributed import save_sharded_adapter, shard_prompt_model  # noqa: F401
    from fastprompt.encoders import clear_encoder_cache, encode_prompt, fused_lstm, fused_mlp  # noqa: F401
    from fastprompt.integration import PrefixCache, PrefixKV  # noqa: F401
    from fastprompt.ops import (  # noqa: F401
        available_backends,
        merge_attention_states,
        prefix_attention,
        resolve_backend,
    )
    from fastprompt.patching import patch, unpatch  # noqa: F401
    from fastprompt.templates import PromptTemplate, PromptTemplateModel, scatter_prompts  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
