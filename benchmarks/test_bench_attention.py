"""pytest-benchmark version of ``bench_attention.py`` on small cases (same builders, same calls).

``pytest benchmarks/test_bench_attention.py --benchmark-only [--benchmark-group-by=param:case]``
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bench_attention import Case, decode_case, fastprompt_call, make_inputs, naive_call

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

SMALL = Case("T", B=2, Hq=4, Hkv=2, T=128, S=128, P=32, D=64)
CASES = {
    "small": SMALL,
    "small-long-prefix": replace(SMALL, sweep="P", P=256),
    "decode": replace(decode_case(DEVICE), B=8),
}
CALLS = {"fastprompt": fastprompt_call, "naive": naive_call}


@pytest.mark.parametrize("impl", list(CALLS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case: str, impl: str) -> None:
    spec, call = CASES[case], CALLS[impl]
    x = make_inputs(spec, DTYPE, DEVICE, requires_grad=False)

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = call(spec, x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(step)
    assert out.shape == (spec.B, spec.Hq, spec.T, spec.D)


@pytest.mark.parametrize("impl", list(CALLS))
@pytest.mark.parametrize("case", [name for name, spec in CASES.items() if spec.trains])
def test_forward_backward(benchmark, case: str, impl: str) -> None:
    spec, call = CASES[case], CALLS[impl]
    x = make_inputs(spec, DTYPE, DEVICE, requires_grad=True)
    grad_out = torch.randn(spec.B, spec.Hq, spec.T, spec.D, dtype=DTYPE, device=DEVICE)

    def step() -> torch.Tensor:
        out = call(spec, x)
        out.backward(grad_out)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(step)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in x.values())
