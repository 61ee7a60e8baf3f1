"""fastprompt: fused kernels for prompt-based tuning on Hugging Face transformers.

Public API (imported lazily, so ``import fastprompt`` stays cheap and pulls in neither triton nor the
C++ build)::

    fastprompt.prefix_attention(q, k, v, prefix_k, prefix_v, ...)   # the op
    fastprompt.merge_attention_states(out_a, lse_a, out_b, lse_b)   # merge partial attention by LSE
    fastprompt.patch(model) / fastprompt.unpatch(model)              # transformers / PEFT integration
    fastprompt.encode_prompt(encoder, tokens, cache=cache)           # fused prompt encoders, once per forward;
                                                                     #   cache: an EncoderCache its owner keeps
    fastprompt.PromptTemplate / PromptTemplateModel                  # P-tuning with prompts anywhere
    fastprompt.load_adapter / cache_prompt / export_prefix_kv        # serving: many prefixes in one batch
    fastprompt.shard_prompt_model / save_sharded_adapter             # FSDP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastprompt.errors import BackendUnavailableError, UnsupportedModelError

__version__ = "0.1.0"

_LAZY = {
    "prefix_attention": "fastprompt.attention",
    "merge_attention_states": "fastprompt.attention",
    "check_index_values": "fastprompt.attention",
    "available_backends": "fastprompt.attention",
    "resolve_backend": "fastprompt.attention",
    "encode_prompt": "fastprompt.encoders",
    "EncoderCache": "fastprompt.encoders",
    "fused_mlp": "fastprompt.encoders",
    "fused_lstm": "fastprompt.encoders",
    "resolve_encoder_backend": "fastprompt.encoders",
    "available_encoder_backends": "fastprompt.encoders",
    "PrefixKV": "fastprompt.prefix",
    "ExportedPrefix": "fastprompt.prefix",
    "PrefixCache": "fastprompt.hf.attention",
    "patch": "fastprompt.hf.patching",
    "unpatch": "fastprompt.hf.patching",
    "PromptTemplate": "fastprompt.hf.templates",
    "PromptTemplateModel": "fastprompt.hf.templates",
    "scatter_prompts": "fastprompt.hf.templates",
    "adapter_registry": "fastprompt.hf.state",
    "shard_prompt_model": "fastprompt.hf.distributed",
    "save_sharded_adapter": "fastprompt.hf.distributed",
    "enable_encoder_checkpoints": "fastprompt.hf.checkpoints",
    "disable_encoder_checkpoints": "fastprompt.hf.checkpoints",
    "load_adapter": "fastprompt.serving",
    "cache_prompt": "fastprompt.serving",
    "export_prefix_kv": "fastprompt.serving",
    "load_prefix_kv": "fastprompt.serving",
}

__all__ = ["BackendUnavailableError", "UnsupportedModelError", "__version__", *_LAZY]

if TYPE_CHECKING:
    from fastprompt.attention import (  # noqa: F401
        available_backends,
        check_index_values,
        merge_attention_states,
        prefix_attention,
        resolve_backend,
    )
    from fastprompt.encoders import (  # noqa: F401
        EncoderCache,
        available_encoder_backends,
        encode_prompt,
        fused_lstm,
        fused_mlp,
        resolve_encoder_backend,
    )
    from fastprompt.hf.attention import PrefixCache  # noqa: F401
    from fastprompt.hf.checkpoints import disable_encoder_checkpoints, enable_encoder_checkpoints  # noqa: F401
    from fastprompt.hf.distributed import save_sharded_adapter, shard_prompt_model  # noqa: F401
    from fastprompt.hf.patching import patch, unpatch  # noqa: F401
    from fastprompt.hf.state import adapter_registry  # noqa: F401
    from fastprompt.hf.templates import PromptTemplate, PromptTemplateModel, scatter_prompts  # noqa: F401
    from fastprompt.prefix import ExportedPrefix, PrefixKV  # noqa: F401
    from fastprompt.serving import cache_prompt, export_prefix_kv, load_adapter, load_prefix_kv  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
