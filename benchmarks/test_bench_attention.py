"""pytest-benchmark version of ``bench_attention.py`` on small cases (same builders, same calls).

``pytest benchmarks/test_bench_attention.py --benchmark-only [--benchmark-group-by=param:case]``
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bench_attention import MODES, Case, decode_case, fastprompt_call, make_step, naive_call

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

SMALL = Case("T", B=2, Hq=4, Hkv=2, T=128, S=128, P=32, D=64)
CASES = {
    "small": SMALL,
    "small-long-prefix": replace(SMALL, sweep="P", P=256),
    "decode": replace(decode_case(DEVICE), B=8),
}
CALLS = {"fastprompt": fastprompt_call, "naive": naive_call}
PARAMS = [(case, mode) for case, spec in CASES.items() for mode in (MODES if spec.trains else MODES[:1])]


@pytest.mark.parametrize("impl", list(CALLS))
@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_prefix_attention(benchmark, case: str, mode: str, impl: str) -> None:
    spec = CASES[case]
    result = benchmark(make_step(CALLS[impl], spec, mode, DTYPE, DEVICE))
    out, grads = (result, ()) if mode == "forward" else result
    assert out.shape == (spec.B, spec.Hq, spec.T, spec.D)
    assert all(g.abs().sum() > 0 for g in grads)
