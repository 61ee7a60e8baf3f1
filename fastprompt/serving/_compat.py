"""What the serving layer needs from ``transformers`` that changed between its releases (to be folded into
the package's one compatibility module): the name of a forward's cache argument, and a cache layer's K/V."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

__all__ = ["CACHE_KWARG", "cache_layer_kv"]

# transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until its removal).
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, Hkv, S, D] stored for layer ``layer_idx``."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values
