"""Prefix tuning (Li & Liang 2021), with the projection MLP or without it (P-tuning v2's deep prompts).

PEFT's ``PrefixEncoder`` yields one row ``[L * 2 * Hkv * D]`` per virtual token, laid out ``[L, 2, Hkv, D]``
(layer, then keys/values, then heads, as ``get_prompt`` reads it); viewed and permuted, that is the prefix
block [L, 2, Hkv, P, D]. The MLP runs once per step for all rows, never per row.
"""

from __future__ import annotations

from typing import Any

import torch

from fastprompt.encoders import EncoderCache
from fastprompt.methods.base import ModelFit, Output, PromptMethod, Training
from fastprompt.prefix.bank import KVGeometry

__all__ = ["PrefixTuning"]


class PrefixTuning(PromptMethod):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    output = Output.KV
    training = Training.PREFIX

    def _new_encoder(self, config: Any) -> torch.nn.Module:
        from peft.tuners.prefix_tuning.model import PrefixEncoder

        return PrefixEncoder(config)

    def geometry(self, config: Any) -> KVGeometry:
        """The key/value geometry the adapter's prefix has (PEFT's ``num_attention_heads`` are key/value heads)."""
        heads = config.num_attention_heads
        return KVGeometry(config.num_layers, heads, config.token_dim // heads)

    def produce(self, encoder: torch.nn.Module, config: Any, cache: EncoderCache | None = None) -> torch.Tensor:
        """The adapter's keys and values [L, 2, Hkv, P, D], a view of the encoder's output."""
        flat = super().produce(encoder, config, cache)
        geometry = self.geometry(config)
        shape = (self.length(config), geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim)
        return flat.view(shape).permute(1, 2, 3, 0, 4)

    def mismatch(self, config: Any, model: ModelFit) -> str | None:
        adapter = self.geometry(config)
        problem = adapter.mismatch(model.geometry)
        if problem is None:
            return None
        return (
            f"was made for a model with {adapter.describe()}, which does not fit this model "
            f"({model.geometry.describe()}): {problem}"
        )
