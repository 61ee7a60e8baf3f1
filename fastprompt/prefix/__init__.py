"""Prefix banks, independent of a model's forward.

- :mod:`~fastprompt.prefix.kv`: :class:`PrefixKV`, the bank one forward reads and the bank row of each batch row;
- :mod:`~fastprompt.prefix.bank`: the base model's key/value geometry, stacking per-prefix blocks
  ``[L, 2, Hkv, P_i, D]`` into one bank ``[L, 2, N, Hkv, P_max, D]`` with ``prefix_lens``, and each batch
  row's position offset and position ids;
- :mod:`~fastprompt.prefix.export`: :class:`ExportedPrefix`, one prefix with what a serving stack needs to
  use it, saved to and loaded from safetensors;
- :mod:`~fastprompt.prefix.peft`: PEFT's prompt-learning encoders, built from an adapter's config and
  saved weights, and what they produce (a prefix-tuning adapter's K/V, the virtual-token embeddings of
  P-tuning and prompt tuning).
"""

from fastprompt.prefix.bank import KVGeometry, row_offsets, row_position_ids, stack_prefixes
from fastprompt.prefix.export import ExportedPrefix
from fastprompt.prefix.kv import PrefixKV
from fastprompt.prefix.peft import build_prompt_encoder, prefix_tuning_kv, virtual_token_embeddings

__all__ = [
    "ExportedPrefix",
    "KVGeometry",
    "PrefixKV",
    "build_prompt_encoder",
    "prefix_tuning_kv",
    "row_offsets",
    "row_position_ids",
    "stack_prefixes",
    "virtual_token_embeddings",
]
