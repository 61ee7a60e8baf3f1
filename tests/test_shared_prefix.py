"""Shared-prefix decode: the Triton backend's grouped decode path against the float64 oracle.

A decode call (T <= 16) whose rows share bank rows reads each bank row once per group of rows
(``_grouped_prefix_kernel``) and merges that with each row's own cache part by log-sum-exp. The path is
checked directly (forced on) against the oracle and against the per-row decode path, and through
``fastprompt.prefix_attention``, which takes it on its own when the shapes call for it. Cases mix groups:
several bank rows, rows with no prefix, bank rows cut short or empty, GQA/MQA, T = 1 and T > 1, key
padding, caches longer than the new queries (causal, bottom-right). The ``torch`` and ``cpu`` backends
already group rows by bank row in their forward (tested with every other case in test_prefix_attention.py).
"""

from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt.attention.cases import TOLERANCE, make_case, max_error, scale_of
from fastprompt.attention.reference import reference_prefix_attention

pa = pytest.importorskip("fastprompt.kernels.prefix_attention", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    # three bank rows, one cut short and one empty, a row without prefix; GQA 4; one new token; left padding
    "mixed-decode": dict(B=7, Hq=8, Hkv=2, T=1, S=9, N=3, P=40, prefix_index=[2, 0, -1, 2, 1, 2, 0],
                         prefix_lens=[40, 0, 23], padding="left"),
    # MQA, T = 3 new tokens after a cache (S > T), right padding, a prefix over several tiles
    "mqa-multi-token": dict(B=5, Hq=4, Hkv=1, T=3, S=7, N=2, P=70, prefix_index=[1, 1, 1, 0, -1],
                            prefix_lens=[5, 70], padding="right"),
    # one group larger than a query tile (9 rows x 8 heads) next to a group of one row; bidirectional
    "large-group": dict(B=10, Hq=8, Hkv=1, T=1, S=4, N=2, P=33, prefix_index=[0] * 9 + [1], causal=False),
    # no prefix_index: every row reads the one bank row
    "one-prefix": dict(B=4, Hq=4, Hkv=2, T=2, S=6, N=1, P=50),
    # no row has a prefix
    "no-prefix": dict(B=3, Hq=4, Hkv=2, T=2, S=5, N=2, P=8, prefix_index=[-1, -1, -1]),
}


def _case(name: str, dtype: torch.dtype = torch.float32, **overrides):
    return make_case(**{**CASES[name], **overrides}, dtype=dtype, device=DEVICE, requires_grad=False)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    err, bound = max_error(actual, expected), tol * scale_of(expected)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_decode_matches_reference(name: str) -> None:
    case = _case(name)
    out, lse = pa.forward(case.args(), group_rows=True)
    ref_out, ref_lse = reference_prefix_attention(case.record())
    tol = TOLERANCE[torch.float32].out
    assert out.dtype == case.q.dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows with nothing to attend to differ"
    _assert_close(out, ref_out, tol, "out")
    _assert_close(lse, ref_lse, tol, "lse")
    # the per-row decode path computes the same thing in another order
    per_row_out, per_row_lse = pa.forward(case.args(), group_rows=False)
    _assert_close(out, per_row_out.double(), tol, "out vs per-row decode")
    _assert_close(lse, per_row_lse.double(), tol, "lse vs per-row decode")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grouped_decode_half_precision(dtype: torch.dtype) -> None:
    case = _case("mixed-decode", dtype)
    out, lse = pa.forward(case.args(), group_rows=True)
    ref_out, ref_lse = reference_prefix_attention(case.record())
    assert out.dtype == dtype
    _assert_close(out, ref_out, TOLERANCE[dtype].out, "out")
    _assert_close(lse, ref_lse, max(TOLERANCE[dtype].out, TOLERANCE[torch.float32].out), "lse")


def test_grouped_decode_custom_scale_and_strides() -> None:
    case = _case("mqa-multi-token", strided=True)
    out, _ = pa.forward(case.args(scale=0.3), group_rows=True)
    ref_out, _ = reference_prefix_attention(case.record(scale=0.3))
    _assert_close(out, ref_out, TOLERANCE[torch.float32].out, "out")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (dict(B=4, N=2, P=256, T=1), True),  # rows share bank rows, a long prefix: grouped
        (dict(B=4, N=1, P=300, T=16), True),
        (dict(B=4, N=4, P=300, T=1), False),  # as many bank rows as rows: nothing to share for sure
        (dict(B=80, N=64, P=256, T=1), True),
        (dict(B=80, N=65, P=256, T=1), False),  # the grid of the grouped path grows as N squared
        (dict(B=4, N=2, P=255, T=1), False),  # a short prefix: the extra launches cost more than they save
        (dict(B=4, N=2, P=300, T=17), False),  # not a decode call
    ],
)
def test_grouped_path_chosen_from_shapes(shape: dict, expected: bool) -> None:
    case = make_case(**shape, Hq=2, Hkv=1, D=4, prefix_index=[0] * shape["B"] if shape["N"] > 1 else None,
                     requires_grad=False)
    assert pa.groups_rows(case.args()) is expected
    assert pa.groups_rows(case.args(dropout_p=0.1)) is False  # the grouped kernel has no dropout


def test_grouped_path_refuses_dropout() -> None:
    case = _case("one-prefix")
    with pytest.raises(ValueError, match="the grouped decode path has no dropout"):
        pa.forward(case.args(dropout_p=0.2), group_rows=True)


def test_op_takes_the_grouped_path_and_matches_reference(monkeypatch) -> None:
    """Through the public op: rows sharing a 260-key prefix (grouped by the backend on its own), with a
    row without prefix and a bank row cut short; the grouped kernel must actually run."""
    case = make_case(B=5, Hq=4, Hkv=2, T=1, S=6, N=2, P=260, D=16, prefix_index=[1, 0, 1, -1, 1],
                     prefix_lens=[200, 260], padding="left", device=DEVICE, requires_grad=False)
    assert pa.groups_rows(case.args())
    launched = []
    grouped = pa._forward_grouped
    monkeypatch.setattr(pa, "_forward_grouped", lambda args, tiles=None: launched.append(1) or grouped(args, tiles))
    out, lse = fastprompt.prefix_attention(*case.tensors, **case.options, return_lse=True, backend="triton")
    assert launched == [1]
    ref_out, ref_lse = reference_prefix_attention(case.record())
    _assert_close(out, ref_out, TOLERANCE[torch.float32].out, "out")
    _assert_close(lse, ref_lse, TOLERANCE[torch.float32].out, "lse")


def test_op_with_grouped_forward_still_trains() -> None:
    """A short-query call with gradients: the grouped forward's lse feeds the per-row backward kernels."""
    case = make_case(B=3, Hq=2, Hkv=1, T=2, S=4, N=1, P=256, D=16, device=DEVICE)
    args = case.args()
    assert pa.groups_rows(args)
    out = fastprompt.prefix_attention(*case.tensors, **case.options, backend="triton")
    ref_out, _ = reference_prefix_attention(case.record())
    grad_out = torch.randn_like(ref_out)
    grads = torch.autograd.grad((out.double() * grad_out).sum(), case.tensors)
    leaves = [x.detach().double().requires_grad_(True) for x in case.tensors]
    ref_out, _ = reference_prefix_attention(case.record().with_inputs(leaves))
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum(), leaves)
    for name, g, ref in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads, ref_grads, strict=True):
        _assert_close(g, ref, TOLERANCE[torch.float32].grad, f"d{name}")


def test_torch_compile_traces_the_op_on_the_grouped_path() -> None:
    case = make_case(B=4, Hq=2, Hkv=1, T=1, S=3, N=2, P=256, D=16, prefix_index=[0, 1, 0, 0],
                     device=DEVICE, requires_grad=False)
    assert pa.groups_rows(case.args())
    options = case.options

    def attend(q, k, v, pk, pv):
        return fastprompt.prefix_attention(q, k, v, pk, pv, **options, backend="triton")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*case.tensors), attend(*case.tensors))
