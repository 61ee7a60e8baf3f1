"""pytest-benchmark version of ``bench_encoders.py`` on its ``--small`` cases (same builders, same steps).

``pytest benchmarks/test_bench_encoders.py --benchmark-only --benchmark-group-by=param:case``
"""

from __future__ import annotations

import pytest
import torch
from bench_encoders import build, cases, fastprompt_step, peft_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = {case.label: case for case in cases(small=True)}
STEPS = {"fastprompt": fastprompt_step, "peft": peft_step}


@pytest.mark.parametrize("impl", list(STEPS))
@pytest.mark.parametrize("case", list(CASES))
def test_encoder_forward_backward(benchmark, case: str, impl: str) -> None:
    spec = CASES[case]
    module = build(spec, DTYPE, DEVICE)
    with torch.no_grad():
        width = module(torch.arange(spec.P, device=DEVICE)[None]).shape[-1]
    grad = torch.randn(spec.P, width, device=DEVICE, dtype=DTYPE)

    def step() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        out = STEPS[impl](module, spec, grad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(step)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
