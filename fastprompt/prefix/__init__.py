"""Prefix banks, independent of a model's forward.

- :mod:`~fastprompt.prefix.kv`: :class:`PrefixKV`, the bank one forward reads and the bank row of each batch row;
- :mod:`~fastprompt.prefix.bank`: the base model's key/value geometry, stacking per-prefix blocks
  ``[L, 2, Hkv, P_i, D]`` into one bank ``[L, 2, N, Hkv, P_max, D]`` with ``prefix_lens``, and each batch
  row's position offset and position ids;
- :mod:`~fastprompt.prefix.export`: :class:`ExportedPrefix`, one prefix with what a serving stack needs to
  use it, saved to and loaded from safetensors.

The prompt-learning methods that produce prefixes are declared in :mod:`fastprompt.methods`.
"""

from fastprompt.prefix.bank import KVGeometry, row_offsets, row_position_ids, stack_prefixes
from fastprompt.prefix.export import ExportedPrefix
from fastprompt.prefix.kv import PrefixKV

__all__ = [
    "ExportedPrefix",
    "KVGeometry",
    "PrefixKV",
    "row_offsets",
    "row_position_ids",
    "stack_prefixes",
]
