"""``benchmarks/tune_attention.py`` runs end to end (on CPU under the interpreter, with a stand-in timer):
every candidate of every kernel yields a row, timed under its own tile table."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tune_attention  # noqa: E402

from fastprompt.bench.attention import Case  # noqa: E402
from fastprompt.kernels import prefix_attention as pa  # noqa: E402


def test_sweep_times_every_candidate_under_its_own_tile_table(monkeypatch) -> None:
    tiles = [(16, 16, 4, 1), (32, 16, 4, 1)]
    monkeypatch.setattr(tune_attention, "CANDIDATES", {"fwd": tiles, "dq": tiles, "dkdv": tiles[::-1]})
    timed: list[object] = []

    def timer(fn) -> float:
        fn()
        timed.append(tuple(fn.keywords["tiles"].items()))
        return 2.0

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run under the interpreter
    case = Case("tiny", B=1, Hq=2, Hkv=1, T=20, S=20, P=5, D=32)
    rows = tune_attention.sweep(case, torch.float32, device=device, timer=timer)
    assert len(rows) == 6 and len(set(timed)) == 6  # each row ran under its own table
    q = torch.empty(1, 2, 20, 32, device=device)
    candidates = tune_attention.CANDIDATES
    marked = [f"| D=32 | {k} | {t} (shipped) |" for k in ("fwd", "dq", "dkdv") for t in candidates[k]
              if tuple(pa.shipped_config(q, k)) == t]
    assert [row for row in rows if "(shipped)" in row] == [row for row in rows if row.startswith(tuple(marked))]
    fwd = "(16, 16, 4, 1) (shipped)" if tuple(pa.shipped_config(q, "fwd")) == tiles[0] else "(16, 16, 4, 1)"
    assert rows[0] == f"| D=32 | fwd | {fwd} | 2.000 | {case.flops() / 2.0 / 1e9:.0f} |"
