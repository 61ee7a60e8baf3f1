"""PEFT's prompt-learning adapters as prefixes: encoders built from saved adapters, and what they produce.

PEFT saves a prompt-learning adapter as ``adapter_config.json`` plus ``adapter_model.safetensors`` holding one
tensor, ``prompt_embeddings`` [P, out_dim]: the encoder's *output* for its ``P`` virtual tokens (the
projection MLP, the P-tuning MLP or LSTM already applied), and marks the config ``inference_mode``. So a
saved adapter is rebuilt as PEFT's inference-mode encoder, a plain table, whatever it was trained with.

Layouts (as PEFT's ``get_prompt`` reads them): a prefix-tuning output row is ``[L * 2 * Hkv * D]``, viewed
``[L, 2, Hkv, D]`` (layer, then keys/values, then heads); P-tuning and prompt tuning give ``[P, hidden]``
input embeddings of the virtual tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from fastprompt.encoders import encode_prompt
from fastprompt.errors import UnsupportedModelError

__all__ = ["PREFIX_TYPES", "SOFT_PROMPT_TYPES", "build_prompt_encoder", "peft_type", "prefix_tuning_kv",
           "virtual_token_embeddings"]

PREFIX_TYPES = ("PREFIX_TUNING",)
SOFT_PROMPT_TYPES = ("P_TUNING", "PROMPT_TUNING")


def peft_type(config: Any) -> str:
    """``"PREFIX_TUNING"``, ``"LORA"``, ... of a PEFT config (its enum's value)."""
    kind = config.peft_type
    return getattr(kind, "value", kind)


def _virtual_tokens(config: Any) -> torch.Tensor:
    # PEFT's prompt_tokens are arange(num_virtual_tokens * num_transformer_submodules); one submodule here.
    return torch.arange(config.num_virtual_tokens)


def _check_single_submodule(config: Any) -> None:
    if (config.num_transformer_submodules or 1) != 1:
        raise UnsupportedModelError(
            "prompt learning on encoder-decoder models (two transformer submodules) is not supported"
        )


def build_prompt_encoder(config: Any, prompt_embeddings: torch.Tensor) -> torch.nn.Module:
    """PEFT's inference-mode encoder of a saved adapter, holding ``prompt_embeddings`` [P, out_dim].

    ``config``: the adapter's PEFT config (PREFIX_TUNING, P_TUNING or PROMPT_TUNING; it is not modified).
    Returns a ``PrefixEncoder``, ``PromptEncoder`` or ``PromptEmbedding`` in eval mode with frozen weights,
    on the device and in the dtype of ``prompt_embeddings``.
    """
    import copy

    from peft.tuners.p_tuning.model import PromptEncoder
    from peft.tuners.prefix_tuning.model import PrefixEncoder
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    kind = peft_type(config)
    _check_single_submodule(config)
    config = copy.copy(config)
    config.inference_mode = True  # the saved tensor is the encoder's output: no MLP or LSTM to build
    if kind == "PREFIX_TUNING":
        encoder: torch.nn.Module = PrefixEncoder(config)
    elif kind == "P_TUNING":
        encoder = PromptEncoder(config)
    elif kind == "PROMPT_TUNING":
        encoder = PromptEmbedding(config, None)
    else:
        raise UnsupportedModelError(f"a {kind} adapter is not prompt learning; expected one of "
                                    f"{PREFIX_TYPES + SOFT_PROMPT_TYPES}")
    want = tuple(encoder.embedding.weight.shape)
    if tuple(prompt_embeddings.shape) != want:
        raise ValueError(
            f"the saved prompt_embeddings have shape {tuple(prompt_embeddings.shape)} but the adapter's config "
            f"({kind}, {config.num_virtual_tokens} virtual tokens) needs {want}"
        )
    encoder.embedding.weight = torch.nn.Parameter(prompt_embeddings.detach().clone(), requires_grad=False)
    return encoder.eval()


def prefix_tuning_kv(encoder: torch.nn.Module, config: Any) -> torch.Tensor:
    """A prefix-tuning adapter's keys and values [L, 2, Hkv, P, D] (a view of the encoder's output).

    ``encoder``: its ``PrefixEncoder`` (with the projection MLP, or a plain table); ``config``: its
    ``PrefixTuningConfig``. The encoder runs once through :func:`fastprompt.encode_prompt` (differentiable
    under autograd; cached while its parameters do not change otherwise).
    """
    if peft_type(config) not in PREFIX_TYPES:
        raise ValueError(f"prefix_tuning_kv takes a PREFIX_TUNING adapter, got {peft_type(config)}")
    _check_single_submodule(config)
    flat = encode_prompt(encoder, _virtual_tokens(config))
    heads = config.num_attention_heads
    shape = (config.num_virtual_tokens, config.num_layers, 2, heads, config.token_dim // heads)
    return flat.view(shape).permute(1, 2, 3, 0, 4)


def virtual_token_embeddings(encoder: torch.nn.Module, config: Any) -> torch.Tensor:
    """The input embeddings [P, hidden] of a P-tuning (MLP or LSTM encoder) or prompt-tuning adapter's
    virtual tokens, through :func:`fastprompt.encode_prompt`."""
    if peft_type(config) not in SOFT_PROMPT_TYPES:
        raise ValueError(f"virtual_token_embeddings takes a P_TUNING or PROMPT_TUNING adapter, got {peft_type(config)}")
    _check_single_submodule(config)
    return encode_prompt(encoder, _virtual_tokens(config))
