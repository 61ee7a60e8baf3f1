"""The prefix of one forward: a bank of per-layer keys and values, and the bank row each batch row reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprompt import attention

__all__ = ["PrefixKV"]


@dataclass(frozen=True)
class PrefixKV:
    """The prefix of one forward: per layer keys and values every query may attend to.

    ``bank``: [L, 2, N, Hkv, P, D], ``bank[l, 0]`` the keys and ``bank[l, 1]`` the values of layer ``l``
    (any strides; a view of a prompt encoder's output is fine). ``prefix_index``: [B] int, the bank row
    of each batch row (-1: none); ``None`` means row 0 for every row. ``prefix_lens``: [N] int, valid
    length of each bank row; ``None`` means all ``P``.
    """

    bank: torch.Tensor
    prefix_index: torch.Tensor | None = None
    prefix_lens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bank.dim() != 6 or self.bank.shape[1] != 2:
            raise ValueError(f"bank must be [layers, 2, N, Hkv, P, D], got shape {tuple(self.bank.shape)}")
        # Checked once here, so that the layers can skip the value checks (each one a device sync).
        attention.check_index_values(self.prefix_index, self.prefix_lens, self.bank.shape[2], self.bank.shape[4])

    def every_row_has_full_length(self) -> bool:
        """Whether every batch row sees a prefix of the full bank width ``P`` (reads values: a sync)."""
        full_index = self.prefix_index is None or bool((self.prefix_index >= 0).all())
        full_lens = self.prefix_lens is None or bool((self.prefix_lens == self.length).all())
        return full_index and full_lens

    @property
    def length(self) -> int:
        """``P``, the number of positions the prefix occupies in front of the sequence."""
        return self.bank.shape[4]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer ``layer_idx``, each [N, Hkv, P, D]."""
        if not 0 <= layer_idx < self.bank.shape[0]:
            raise ValueError(f"layer_idx {layer_idx} is outside the prefix bank's {self.bank.shape[0]} layers")
        return self.bank[layer_idx, 0], self.bank[layer_idx, 1]
