"""pytest-benchmark version of ``bench_attention.py`` on small cases (same builders, same calls).

``pytest benchmarks/test_bench_attention.py --benchmark-only [--benchmark-group-by=param:case]``
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastprompt.bench.attention import CALLS, MODES, decode_case, make_step, training_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

SMALL = replace(training_case("SmolLM2-135M", 128, 32, causal=True), B=2)
CASES = {
    "small": SMALL,
    "small-long-prefix-bidirectional": replace(SMALL, P=256, causal=False),
    "decode": replace(decode_case("SmolLM2-135M"), B=8),
}
PARAMS = [(case, mode) for case, spec in CASES.items() for mode in (MODES if spec.trains else MODES[:1])]


@pytest.mark.parametrize("impl", list(CALLS))
@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_prefix_attention(benchmark, case: str, mode: str, impl: str) -> None:
    spec = CASES[case]
    result = benchmark(make_step(CALLS[impl], spec, mode, DTYPE, DEVICE))
    out, grads = (result, ()) if mode == "forward" else result
    assert out.shape == (spec.B, spec.Hq, spec.T, spec.D)
    used = grads[:3] if impl == "sdpa" else grads  # SDPA without the prefix leaves the prefix unused
    assert all(g.abs().sum() > 0 for g in used)
