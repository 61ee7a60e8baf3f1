"""A directory of exported prefixes, the hand-over between the process that compiles adapters and vLLM's workers.

Each prefix is one :class:`~fastprompt.prefix.ExportedPrefix` file, ``<name>.safetensors``; ``index.json`` lists
the names with what the scheduler needs without reading any tensor (prefix length, cache salt). This module does
not import vLLM: the worker-side connector and the entry point both read the directory through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprompt.prefix import ExportedPrefix

__all__ = ["INDEX_FILE", "PrefixEntry", "read_index", "write_store"]

INDEX_FILE = "index.json"
_FORMAT = "fastprompt.vllm_prefixes"


@dataclass(frozen=True)
class PrefixEntry:
    """One named prefix: ``length`` P placeholder positions, the ``salt`` that keeps its cache blocks its own, the
    ``file`` holding its K/V [L, 2, Hkv, P, D] and ``kind`` (informational: ``"prefix_tuning"``, ``"p_tuning"``,
    ...)."""

    name: str
    length: int
    salt: str
    file: Path
    kind: str


def _salt(name: str, exported: ExportedPrefix) -> str:
    """Name and content digest: two prefixes never share a salt, so never a prefix-cache block, even at equal
    length and equal placeholder ids; an adapter reloaded with other weights under the same name gets a new one."""
    digest = hashlib.sha256(name.encode())
    digest.update(exported.kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return f"fastprompt-{digest.hexdigest()[:32]}"


def write_store(directory: str | os.PathLike[str], prefixes: Mapping[str, ExportedPrefix]) -> dict[str, PrefixEntry]:
    """Save each prefix to ``directory/<name>.safetensors`` and write the index; returns the entries by name."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, exported in prefixes.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"adapter name {name!r} cannot name a file: use letters, digits, '-', '_'")
        file = folder / f"{name}.safetensors"
        exported.save(file)
        entries[name] = PrefixEntry(name, exported.length, _salt(name, exported), file, exported.kind)
    index = {
        "format": _FORMAT,
        "prefixes": {e.name: {"length": e.length, "salt": e.salt, "file": e.file.name, "kind": e.kind}
                     for e in entries.values()},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return entries


def read_index(directory: str | os.PathLike[str]) -> dict[str, PrefixEntry]:
    """The entries of a directory :func:`write_store` wrote, by name; ``ValueError`` for any other directory."""
    folder = Path(directory)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no fastprompt prefixes ({INDEX_FILE} is missing)")
    index = json.loads(path.read_text())
    if index.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a fastprompt prefix index (format {index.get('format')!r})")
    return {
        name: PrefixEntry(name, int(e["length"]), e["salt"], folder / e["file"], e["kind"])
        for name, e in index["prefixes"].items()
    }
