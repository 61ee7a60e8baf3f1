"""Shared-prefix decode (``fastprompt.shared_prefix``) on every backend against the float64 oracle.

The grouped prefix part alone is checked against the oracle over the prefix keys only; the cascade
(prefix part + each row's cache, merged by log-sum-exp) against the oracle and against the op itself.
Cases mix groups: several bank rows, rows with no prefix, bank rows cut short or empty, GQA/MQA, T = 1
and T > 1, key padding, caches longer than the new queries (causal, bottom-right).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_prefix_attention import (
    TOLERANCE,
    _cpu_tensor_backends,
    _device_for,
    _expected_here,
    _max_err,
    _scale_of,
    make_case,
)

import fastprompt
from fastprompt.errors import BackendUnavailableError
from fastprompt.naive import reference_prefix_attention
from fastprompt.ops import available_backends
from fastprompt.shared_prefix import SharedPrefixPlan, grouped_prefix_attention, shared_prefix_decode

CASES = {
    # three bank rows, one cut short and one empty, a row without prefix; GQA 4; one new token; left padding
    "mixed-decode": dict(B=7, Hq=8, Hkv=2, T=1, S=9, N=3, P=40, prefix_index=[2, 0, -1, 2, 1, 2, 0],
                         prefix_lens=[40, 0, 23], padding="left"),
    # MQA, T = 3 new tokens after a cache (S > T), right padding, a prefix of 70 keys over several tiles
    "mqa-multi-token": dict(B=5, Hq=4, Hkv=1, T=3, S=7, N=2, P=70, prefix_index=[1, 1, 1, 0, -1],
                            prefix_lens=[5, 70], padding="right"),
    # one group larger than a query tile (9 rows x 8 heads) next to a group of one row; bidirectional
    "large-group": dict(B=10, Hq=8, Hkv=1, T=1, S=4, N=2, P=33, prefix_index=[0] * 9 + [1], causal=False),
    # no row has a prefix
    # a prefix longer than the C++ kernel's largest chunk: partials over chunks merged; one row without
    "long-prefix": dict(B=3, Hq=2, Hkv=1, T=1, S=2, N=1, P=2100, prefix_index=[0, 0, -1]),
    "no-prefix": dict(B=3, Hq=4, Hkv=2, T=2, S=5, N=2, P=8, prefix_index=[-1, -1, -1]),
}


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend(request, monkeypatch) -> str:
    name = request.param
    ok, reason = available_backends(_device_for(name))[name]
    if not ok:
        if _expected_here(name):
            pytest.fail(f"backend {name} should be available here but is not: {reason}")
        pytest.skip(f"backend {name} unavailable: {reason}")
    monkeypatch.setenv("FASTPROMPT_BACKEND", name)  # the op compared against runs the same backend
    return name


def _case_and_plan(spec: dict, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    case = make_case(**spec, device=device, dtype=dtype, generator=generator)
    q, k, v, pk, pv = (x.detach() for x in case.tensors)
    options = case.options
    plan = SharedPrefixPlan.build(options["prefix_index"], options.get("prefix_lens"),
                                  num_prefixes=pk.shape[0], prefix_len=pk.shape[2])
    return (q, k, v, pk, pv), options, plan


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    err, bound = _max_err(actual, expected), tol * _scale_of(expected)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_prefix_part_matches_reference(name: str, backend: str) -> None:
    (q, _, _, pk, pv), options, plan = _case_and_plan(CASES[name], _device_for(backend))
    out, lse = grouped_prefix_attention(q, pk, pv, plan, backend=backend)
    no_keys = q.new_empty(q.shape[0], pk.shape[1], 0, q.shape[3])
    ref_out, ref_lse = reference_prefix_attention(
        q, no_keys, no_keys, pk, pv, prefix_index=options["prefix_index"], prefix_lens=options.get("prefix_lens"),
        causal=False,
    )
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without a prefix must have lse = -inf"
    assert torch.equal(out[torch.isinf(ref_lse)], torch.zeros_like(out[torch.isinf(ref_lse)]))
    _assert_close(out, ref_out, TOLERANCE[torch.float32][0], "out")
    _assert_close(lse, ref_lse, TOLERANCE[torch.float32][0], "lse")


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_reference_and_op(name: str, backend: str) -> None:
    (q, k, v, pk, pv), options, plan = _case_and_plan(CASES[name], _device_for(backend), seed=1)
    kpm, causal = options.get("key_padding_mask"), options["causal"]
    out = shared_prefix_decode(q, k, v, pk, pv, plan, key_padding_mask=kpm, causal=causal, backend=backend)
    ref_out, _ = reference_prefix_attention(q, k, v, pk, pv, **options)
    op_out = fastprompt.prefix_attention(q, k, v, pk, pv, **options)
    tol = TOLERANCE[torch.float32][0]
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    _assert_close(out, ref_out, tol, "out vs reference")
    _assert_close(out, op_out.double(), tol, "out vs prefix_attention")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype: torch.dtype, backend: str) -> None:
    (q, k, v, pk, pv), options, plan = _case_and_plan(CASES["mixed-decode"], _device_for(backend), dtype, seed=2)
    out = shared_prefix_decode(q, k, v, pk, pv, plan, key_padding_mask=options["key_padding_mask"], backend=backend)
    ref_out, _ = reference_prefix_attention(q, k, v, pk, pv, **options)
    assert out.dtype == dtype
    _assert_close(out, ref_out, TOLERANCE[dtype][0], "out")


@pytest.mark.parametrize("name", ["mixed-decode", "long-prefix"])
def test_float64_prefix_part(name: str) -> None:
    (q, _, _, pk, pv), options, plan = _case_and_plan(CASES[name], "cpu", torch.float64, seed=4)
    no_keys = q.new_empty(q.shape[0], pk.shape[1], 0, q.shape[3])
    ref_out, ref_lse = reference_prefix_attention(
        q, no_keys, no_keys, pk, pv, prefix_index=options["prefix_index"], prefix_lens=options.get("prefix_lens"),
        causal=False,
    )
    for backend in _cpu_tensor_backends():
        out, lse = grouped_prefix_attention(q, pk, pv, plan, backend=backend)
        assert out.dtype == torch.float64
        _assert_close(out, ref_out, TOLERANCE[torch.float64][0], f"{backend} out")
        _assert_close(lse, ref_lse, TOLERANCE[torch.float32][0], f"{backend} lse (float32 by contract)")


def test_custom_scale(backend: str) -> None:
    (q, k, v, pk, pv), options, plan = _case_and_plan(CASES["mqa-multi-token"], _device_for(backend), seed=3)
    out = shared_prefix_decode(q, k, v, pk, pv, plan, key_padding_mask=options["key_padding_mask"], scale=0.3,
                               backend=backend)
    ref_out, _ = reference_prefix_attention(q, k, v, pk, pv, **options, scale=0.3)
    _assert_close(out, ref_out, TOLERANCE[torch.float32][0], "out")


def test_plan_groups_rows_by_bank_row() -> None:
    plan = SharedPrefixPlan.build(torch.tensor([2, 0, -1, 2, 1, 0]), torch.tensor([4, 0, 6]),
                                  num_prefixes=3, prefix_len=6)
    # bank row 1 has length 0, so its row joins the rows without prefix in the last group
    assert plan.groups == ((0, 4, 0, 2), (2, 6, 2, 4), (-1, 0, 4, 6))
    assert plan.order.tolist() == [1, 5, 0, 3, 2, 4]
    assert plan.group_starts.tolist() == [0, 2, 4, 6]
    assert plan.group_banks.tolist() == [0, 2, -1] and plan.group_lens.tolist() == [4, 6, 0]
    assert plan.order.dtype == torch.int32 and (plan.max_group_rows, plan.max_len) == (2, 6)


@pytest.mark.parametrize(
    ("index", "lens", "error", "message"),
    [
        (torch.tensor([0, 3]), None, ValueError, r"prefix_index values must be in \[-1, N\) with N = 3"),
        (torch.tensor([0, -2]), None, ValueError, r"got values in \[-2, 0\]"),
        (torch.tensor([[0, 1]]), None, ValueError, r"prefix_index must be a 1-D tensor \[B\]"),
        (torch.tensor([0.0, 1.0]), None, TypeError, "prefix_index must be an integer tensor"),
        (torch.tensor([], dtype=torch.long), None, ValueError, "at least one batch row"),
        (torch.tensor([0, 1]), torch.tensor([1, 2]), ValueError, r"prefix_lens must have shape \[N\] = \[3\]"),
        (torch.tensor([0, 1]), torch.tensor([1, 2, 9]), ValueError, r"prefix_lens values must be in \[0, P\]"),
        (torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]), TypeError, "prefix_lens must be an integer tensor"),
    ],
)
def test_plan_rejects_bad_index(index, lens, error, message) -> None:
    with pytest.raises(error, match=message):
        SharedPrefixPlan.build(index, lens, num_prefixes=3, prefix_len=8)


def test_plan_must_fit_the_batch() -> None:
    (q, k, v, pk, pv), _, plan = _case_and_plan(CASES["mixed-decode"], "cpu")
    with pytest.raises(ValueError, match="the plan was built for B=7 rows and a bank of N=3 prefixes of P=40 keys"):
        shared_prefix_decode(q[:3], k[:3], v[:3], pk, pv, plan, backend="torch")
    with pytest.raises(ValueError, match=r"got B=7, N=3, P=39"):
        grouped_prefix_attention(q, pk[:, :, :39], pv[:, :, :39], plan, backend="torch")
    with pytest.raises(ValueError, match="the plan's tensors are on meta but q is on cpu"):
        shared_prefix_decode(q, k, v, pk, pv, plan.to("meta"), backend="torch")
    with pytest.raises(TypeError, match="plan must be a SharedPrefixPlan"):
        grouped_prefix_attention(q, pk, pv, plan.groups, backend="torch")
    with pytest.raises(ValueError, match="Hq=8 heads, which must be a positive multiple of the bank's Hkv=3"):
        grouped_prefix_attention(q, pk.repeat(1, 2, 1, 1)[:, :3], pv.repeat(1, 2, 1, 1)[:, :3], plan)


def test_forward_only() -> None:
    (q, k, v, pk, pv), _, plan = _case_and_plan(CASES["mixed-decode"], "cpu")
    with pytest.raises(RuntimeError, match="shared_prefix_decode is forward only"):
        shared_prefix_decode(q.requires_grad_(True), k, v, pk, pv, plan, backend="torch")
    with torch.no_grad():
        assert shared_prefix_decode(q, k, v, pk, pv, plan, backend="torch").shape == q.shape


def test_backend_that_cannot_run_raises() -> None:
    (q, k, v, pk, pv), _, plan = _case_and_plan(CASES["no-prefix"], "cpu")
    meta = [x.to("meta") for x in (q, k, v, pk, pv)]
    with pytest.raises(BackendUnavailableError, match="backend cpu cannot run these tensors here"):
        shared_prefix_decode(*meta, plan.to("meta"), backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cpu, torch or None; got 'fast'"):
        shared_prefix_decode(q, k, v, pk, pv, plan, backend="fast")


@pytest.mark.skipif(not _expected_here("triton"), reason="triton is not installed")
@pytest.mark.parametrize("arch", [90, 80])
def test_grouped_kernel_compiles_for_gpu(arch: int) -> None:
    """The grouped kernel through ``tests/gpu_compile.py``'s compile-only launch (no GPU needed)."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from gpu_compile import SHARED_LIMIT, compile_only, _resource_usage
from fastprompt.kernels.shared_prefix import grouped_prefix_attention
from fastprompt.shared_prefix import SharedPrefixPlan
plan = SharedPrefixPlan.build(torch.tensor([0, 1, 0, -1]), num_prefixes=2, prefix_len=300).to("meta")
seen = []
def record(kernel, grid):
    seen.append((kernel.name, kernel.metadata.shared, *_resource_usage(kernel.asm["cubin"])))
with compile_only({arch}, record):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (64, 128, 256):
            q = torch.empty(4, 8, 1, D, dtype=dtype, device="meta")
            bank = torch.empty(2, 2, 300, D, dtype=dtype, device="meta")
            grouped_prefix_attention(q, bank, bank, plan, D ** -0.5)
for name, shared, regs, stack in seen:
    print(name, shared, regs, stack)
    assert shared <= SHARED_LIMIT[{arch}], (name, shared)
assert {{name for name, *_ in seen}} == {{"_grouped_prefix_kernel", "_merge_kernel"}}, seen
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)  # kernel, shared memory bytes, registers, stack bytes (spills) per compiled variant
