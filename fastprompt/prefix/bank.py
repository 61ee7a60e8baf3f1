"""Stacking prefixes into one bank, and the positions of each batch row's real tokens.

A prefix block is ``[L, 2, Hkv, P, D]``: per layer ``l``, ``block[l, 0]`` the keys and ``block[l, 1]`` the
values of ``P`` prefix positions. A bank ``[L, 2, N, Hkv, P_max, D]`` holds ``N`` blocks of different
lengths; ``prefix_lens [N]`` says how many of a row's ``P_max`` columns are real, and each batch row names
its bank row in ``prefix_index [B]`` (-1: no prefix). Real tokens come after their row's prefix, so a row
with a prefix of length ``P_i`` numbers its first real token ``P_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVGeometry", "row_offsets", "row_position_ids", "stack_prefixes"]


@dataclass(frozen=True)
class KVGeometry:
    """The key/value layout of a model's attention: what a prefix block must match to be used there.

    ``model_type`` and ``name_or_path`` (may be empty) say which model it came from; only ``model_type``
    takes part in :meth:`mismatch`, since the same weights can live under any path.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str = ""
    name_or_path: str = ""

    @classmethod
    def from_config(cls, config: Any) -> KVGeometry:
        """The geometry of a ``transformers`` config (decoder or encoder; multimodal: its text config)."""
        text = config.get_text_config()
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            model_type=getattr(text, "model_type", "") or "",
            name_or_path=getattr(config, "name_or_path", "") or "",
        )

    def describe(self) -> str:
        """E.g. ``"2 layers, 2 key/value heads of size 8 (llama)"``."""
        kind = f" ({self.model_type})" if self.model_type else ""
        return f"{self.num_layers} layers, {self.num_kv_heads} key/value heads of size {self.head_dim}{kind}"

    def mismatch(self, model: KVGeometry) -> str | None:
        """What differs between this prefix geometry and ``model``'s, or ``None`` when the prefix fits."""
        diffs = [
            f"{what} {mine} vs the model's {theirs}"
            for what, mine, theirs in (
                ("layers", self.num_layers, model.num_layers),
                ("key/value heads", self.num_kv_heads, model.num_kv_heads),
                ("head size", self.head_dim, model.head_dim),
            )
            if mine != theirs
        ]
        if self.model_type and model.model_type and self.model_type != model.model_type:
            diffs.append(f"model type {self.model_type!r} vs the model's {model.model_type!r}")
        return "; ".join(diffs) or None

    def check_block(self, kv: torch.Tensor, what: str) -> None:
        """Raise ``ValueError`` unless ``kv`` is a block ``[L, 2, Hkv, P, D]`` of this geometry with ``P >= 1``."""
        want = (self.num_layers, 2, self.num_kv_heads, self.head_dim)
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != want or kv.shape[3] < 1:
            raise ValueError(
                f"{what} must be [layers, 2, Hkv, P, D] = [{want[0]}, 2, {want[2]}, P >= 1, {want[3]}] "
                f"({self.describe()}), got shape {tuple(kv.shape)}"
            )


def stack_prefixes(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prefix blocks of different lengths into one bank.

    Args:
        blocks: ``N >= 1`` tensors ``[L, 2, Hkv, P_i, D]`` of one dtype and device.

    Returns:
        ``(bank, prefix_lens)``: ``bank`` [L, 2, N, Hkv, P_max, D] with block ``i`` in row ``i`` (zeros past
        ``P_i``: never read, but finite, so no backend can turn them into NaN), and ``prefix_lens`` [N] int32.
        A single block is not copied: the bank is a view of it. Gradients flow back to every block.
    """
    if not blocks:
        raise ValueError("stack_prefixes needs at least one prefix block")
    first = blocks[0]
    for i, kv in enumerate(blocks):
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"prefix block {i} must be [L, 2, Hkv, P, D], got shape {tuple(kv.shape)}")
        if (kv.shape[0], kv.shape[2], kv.shape[4]) != (first.shape[0], first.shape[2], first.shape[4]):
            raise ValueError(
                f"prefix block {i} has shape {tuple(kv.shape)} but block 0 has {tuple(first.shape)}: blocks of one "
                "bank share layers, heads and head size and differ only in length"
            )
        if kv.dtype != first.dtype or kv.device != first.device:
            raise ValueError(
                f"prefix block {i} is {kv.dtype} on {kv.device} but block 0 is {first.dtype} on {first.device}"
            )
    lens = torch.tensor([kv.shape[3] for kv in blocks], dtype=torch.int32, device=first.device)
    if len(blocks) == 1:
        return first.unsqueeze(2), lens
    layers, _, kv_heads, _, head_dim = first.shape
    bank = first.new_zeros(layers, 2, len(blocks), kv_heads, int(max(kv.shape[3] for kv in blocks)), head_dim)
    for i, kv in enumerate(blocks):
        bank[:, :, i, :, : kv.shape[3]] = kv
    return bank, lens


def row_offsets(prefix_index: torch.Tensor, prefix_lens: torch.Tensor) -> torch.Tensor:
    """Each batch row's position offset: its prefix length, 0 for a row without a prefix.

    ``prefix_index`` [B] integer (-1: none), ``prefix_lens`` [N] integer. Returns [B] int64.
    """
    lens = prefix_lens.to(torch.int64)[prefix_index.clamp(min=0).to(torch.int64)]
    return torch.where(prefix_index >= 0, lens, torch.zeros_like(lens))


def row_position_ids(offsets: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of every column of a padded batch: the row's offset plus the columns since its first real token.

    ``offsets`` [B] integer (from :func:`row_offsets`); ``attention_mask`` [B, S] (1 = real token; left
    or right padding) covering every token of the rows so far, cached ones included. Returns [B, S] int64:
    leading padding is skipped and every later column counts, so a left-padded row is numbered
    ``offset, offset + 1, ...`` as it would be alone, and a right-padded one as an unpadded forward numbers it
    (padding after the row continues the count; a hole inside a row keeps its column's number). Leading
    padding takes the offset (never seen by a real token, but in range). A decoding step takes the last ``T``
    columns. This is the one numbering rule of the package (:func:`fastprompt.hf.patching.token_positions`
    adds a caller's own numbering and RoBERTa-style models' first id to it).
    """
    if attention_mask.dim() != 2 or offsets.shape != attention_mask.shape[:1]:
        raise ValueError(
            f"attention_mask must be [B, S] and offsets [B], got {tuple(attention_mask.shape)} and "
            f"{tuple(offsets.shape)}"
        )
    started = attention_mask.cumsum(-1) > 0  # from the row's first real token on
    steps = started.to(torch.int64).cumsum(-1) - 1
    return offsets.to(torch.int64)[:, None] + steps.clamp(min=0)
