"""One prefix as a serving stack takes it: per-layer K/V, where real tokens start, and the model it fits."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from fastprompt.prefix.bank import KVGeometry

__all__ = ["ExportedPrefix"]

_FORMAT = "fastprompt.prefix_kv"
_FORMAT_VERSION = "1"
_TENSOR = "kv"


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, so compare fields explicitly
class ExportedPrefix:
    """A prefix block ``kv`` [L, 2, Hkv, P, D] (``kv[l, 0]`` keys, ``kv[l, 1]`` values of layer ``l``).

    ``position_offset``: the position id of the first real token after the prefix. The prefix occupies
    positions ``0 .. P - 1`` (keys are stored as the model produced them, rotated where the model uses
    RoPE; a prefix-tuning adapter's keys are learned as they are), so it is ``P``; it is written out so a
    serving stack need not know that convention. ``geometry``: the base model's layers, key/value heads,
    head size and type. ``kind``: where the prefix came from (``"prefix_tuning"``, ``"p_tuning"``,
    ``"prompt_tuning"``, ``"cached_prompt"``, ...), informational.

    :meth:`save` writes one safetensors file: the tensor under ``"kv"`` and everything else as text in the
    header's metadata, so other stacks read it without fastprompt.
    """

    kv: torch.Tensor
    position_offset: int
    geometry: KVGeometry
    kind: str = "prefix"

    def __post_init__(self) -> None:
        self.geometry.check_block(self.kv, "an exported prefix")
        if self.position_offset != self.length:
            raise ValueError(
                f"position_offset must be the prefix length {self.length} (the prefix occupies positions "
                f"0 .. P - 1), got {self.position_offset}"
            )

    @property
    def length(self) -> int:
        """``P``, the number of prefix positions."""
        return self.kv.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def check_fits(self, config: object) -> None:
        """Raise ``ValueError`` naming what differs when this prefix was made for another model than ``config``'s."""
        model = KVGeometry.from_config(config)
        problem = self.geometry.mismatch(model)
        if problem is not None:
            raise ValueError(
                f"this {self.kind} prefix was made for a model with {self.geometry.describe()}, which does not fit "
                f"this model ({model.describe()}): {problem}"
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (the K/V in its own dtype, contiguous)."""
        from safetensors.torch import save_file

        save_file({_TENSOR: self.kv.detach().contiguous().cpu()}, os.fspath(path), metadata=self._metadata())

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> ExportedPrefix:
        """Read a file written by :meth:`save`; refuses other safetensors files by message."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{os.fspath(path)} is not an exported fastprompt prefix (no {_FORMAT!r} header)")
            if meta.get("format_version") != _FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)} has prefix format version {meta.get('format_version')!r}; this fastprompt "
                    f"reads version {_FORMAT_VERSION}"
                )
            kv = f.get_tensor(_TENSOR)
        geometry = KVGeometry(**json.loads(meta["geometry"]))
        return cls(kv=kv, position_offset=int(meta["position_offset"]), geometry=geometry, kind=meta["kind"])

    def _metadata(self) -> dict[str, str]:
        g = self.geometry
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "position_offset": str(self.position_offset),
            "dtype": str(self.dtype).removeprefix("torch."),
            "layout": "[layers, 2 (keys, values), kv_heads, prefix_len, head_dim]",
            "geometry": json.dumps({
                "num_layers": g.num_layers, "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
                "model_type": g.model_type, "name_or_path": g.name_or_path,
            }),
        }
