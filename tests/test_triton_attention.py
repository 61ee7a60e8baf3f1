"""The triton backend's kernels (``fastprompt.kernels.prefix_attention``) against the float64 oracle.

Kernel-level: ``forward``/``backward`` and the two forward paths are called directly with the argument
record the op would hand them. The op-level tests over every backend live in tests/test_prefix_attention.py.
Without CUDA this runs the kernels under ``TRITON_INTERPRET=1`` on CPU tensors: shapes stay tiny.
Inputs come from the shared case builder, errors are held to the shared table
(``fastprompt.attention.cases``); seeds follow tests/conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fastprompt.attention.args import AttentionArgs
from fastprompt.attention.cases import TOLERANCE, make_case, max_error, scale_of
from fastprompt.attention.reference import _expand_and_concat, reference_prefix_attention
from fastprompt.kernels import prefix_attention as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    T: int
    S: int
    P: int
    N: int
    D: int
    prefix_index: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    padding: tuple[tuple[int, int], ...] | None  # per row: (left, right) padded key count
    causal: bool


CASES = {
    # MQA (4 query heads on 1 kv head), ragged bank, a row without prefix, left and right padding.
    "mqa_pad_ragged": Case(3, 4, 1, 7, 11, 5, 2, 32, (1, -1, 1), (3, 5), ((3, 0), (0, 0), (0, 4)), True),
    # Head dim 80 (padded to 128), P = 17 across two key tiles, a repeated and an unused bank row.
    "bidir_d80": Case(3, 2, 2, 9, 9, 17, 3, 80, (2, 0, 2), (17, 0, 9), None, False),
    # P = 0; row 1 fully padded and prefix-less, row 0 left-padded: queries with nothing to attend to.
    "empty_rows_p0": Case(2, 4, 2, 5, 5, 0, 1, 32, (0, -1), (0,), ((2, 0), (5, 0)), True),
    # One query against 30 key columns: the decode path splits them over two programs; row 1 has no
    # prefix, so its first split sees nothing and the merge must ignore that partial.
    "decode_t1": Case(2, 4, 2, 1, 13, 17, 2, 32, (1, -1), (17, 6), ((0, 0), (4, 0)), True),
    # T > 16 (the general forward): two query tiles, causal tiles skipped.
    "long_t": Case(1, 2, 1, 17, 20, 5, 1, 32, (0,), (5,), ((0, 2),), True),
}


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def make_inputs(case: Case, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """The record's tensor fields (all but causal/scale/dropout/seed), from the shared case builder."""
    built = make_case(
        B=case.B, Hq=case.Hq, Hkv=case.Hkv, T=case.T, S=case.S, P=case.P, N=case.N, D=case.D, dtype=dtype,
        device=DEVICE, padding=case.padding, causal=case.causal, prefix_index=case.prefix_index,
        prefix_lens=case.prefix_lens, requires_grad=False, generator=gen,
    )
    args = built.args()
    return {name: getattr(args, name) for name in (*TENSORS, "prefix_index", "prefix_lens", "key_padding_mask")}


def _args(inputs: dict, causal: bool, dropout_p: float, seed: int) -> AttentionArgs:
    scale = inputs["q"].shape[-1] ** -0.5
    return AttentionArgs(**inputs, causal=causal, scale=scale, dropout_p=dropout_p,
                         seed=torch.tensor(seed) if dropout_p > 0 else None)


def run_forward(fn, inputs: dict, causal: bool, dropout_p: float = 0.0, seed: int = 0):
    return fn(_args(inputs, causal, dropout_p, seed))


def run_backward(grad_out, inputs: dict, out, lse, causal: bool, dropout_p: float = 0.0, seed: int = 0):
    return kernels.backward(_args(inputs, causal, dropout_p, seed), out, lse, grad_out, None)


def reference(inputs: dict, causal: bool, requires_grad: bool = False):
    """Oracle (out, lse) in float64 and the float64 leaves it was computed from."""
    leaves = [inputs[n].detach().double().requires_grad_(requires_grad) for n in TENSORS]
    out, lse = reference_prefix_attention(_args(inputs, causal, 0.0, 0).with_inputs(leaves))
    return out, lse, leaves


TENSORS = ("q", "k", "v", "prefix_k", "prefix_v")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Within ``tol`` of :data:`TOLERANCE` relative to the expected values' scale; equal infinities agree."""
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: infinities differ"
    err, bound = max_error(actual, expected), tol * scale_of(expected)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["general", "decode"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_matches_reference(case: Case, path: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    inputs = make_inputs(case, dtype, gen)
    fn = kernels._forward_general if path == "general" else kernels._forward_decode
    out, lse = run_forward(fn, inputs, case.causal)
    ref_out, ref_lse, _ = reference(inputs, case.causal)
    assert out.dtype == dtype and out.shape == inputs["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == inputs["q"].shape[:3]
    assert_close(out, ref_out, TOLERANCE[dtype].out, "out")
    # lse is fp32 whatever the input dtype; rows with no visible key must be exactly -inf in both.
    assert_close(lse, ref_lse, TOLERANCE[torch.float32].out, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_backward_matches_reference(case: Case, dtype: torch.dtype, gen: torch.Generator) -> None:
    inputs = make_inputs(case, dtype, gen)
    out, lse = run_forward(kernels.forward, inputs, case.causal)
    grad_out = _randn(gen, *out.shape, dtype=dtype)
    grads = run_backward(grad_out, inputs, out, lse, case.causal)

    ref_out, _, leaves = reference(inputs, case.causal, requires_grad=True)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, grad, ref_grad, x in zip(TENSORS, grads, ref_grads, leaves, strict=True):
        assert grad.dtype == dtype and grad.shape == x.shape, name
        assert_close(grad, ref_grad, TOLERANCE[dtype].grad, f"d{name}")

    # Bank positions no row reads get exactly zero, not just something small.
    used = torch.zeros(case.N, case.P, dtype=torch.bool)
    for idx in case.prefix_index:
        if idx >= 0:
            used[idx, : case.prefix_lens[idx]] = True
    for grad in grads[3:]:
        assert torch.all(grad.transpose(1, 2)[~used.to(DEVICE)] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [96, 256])
def test_other_head_dims(D: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    # On CUDA, fp16/bf16 with D > 128 and fp32 with D > 64 take the wide-row tile configs of _config.
    case = Case(2, 2, 1, 3, 5, 3, 1, D, (0, -1), (2,), ((1, 0), (0, 0)), True)
    inputs = make_inputs(case, dtype, gen)
    ref_out, ref_lse, leaves = reference(inputs, case.causal, requires_grad=True)
    for fn in (kernels._forward_general, kernels._forward_decode):
        out, lse = run_forward(fn, inputs, case.causal)
        assert out.dtype == dtype
        assert_close(out, ref_out.detach(), TOLERANCE[dtype].out, "out")
        assert_close(lse, ref_lse.detach(), TOLERANCE[torch.float32].out, "lse")
    grad_out = _randn(gen, *out.shape, dtype=dtype)
    grads = run_backward(grad_out, inputs, out, lse, case.causal)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, grad, ref_grad in zip(TENSORS, grads, ref_grads, strict=True):
        assert grad.dtype == dtype, name
        assert_close(grad, ref_grad, TOLERANCE[dtype].grad, f"d{name}")


def test_grid_rejects_more_than_65535_tiles_on_axes_1_and_2() -> None:
    assert kernels._grid(2**31 - 1, 65535, 64) == (2**31 - 1, 65535, 64)
    with pytest.raises(AssertionError, match="65536 tiles on grid axis 2 exceed CUDA's 65535"):
        kernels._grid(4, 1, 65536)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 65535 grid-axis cap is CUDA's")
@pytest.mark.parametrize("T", [1, 17], ids=["decode", "general"])
def test_batch_times_heads_beyond_65535_programs(T: int, gen: torch.Generator) -> None:
    # B * Hq = B * Hkv = N * Hkv = 65544 programs on the batch-heads axis of every kernel, one past what
    # grid axes 1 and 2 can take; each row has its own bank row so dprefix sees N * Hkv of them too.
    B, H = 5462, 12
    case = Case(B, H, H, T, T, 2, B, 16, tuple(range(B)), (2,) * B, None, True)
    inputs = make_inputs(case, torch.float32, gen)
    out, lse = run_forward(kernels.forward, inputs, case.causal)
    ref_out, ref_lse, leaves = reference(inputs, case.causal, requires_grad=True)
    assert_close(out, ref_out.detach(), TOLERANCE[torch.float32].out, "out")
    assert_close(lse, ref_lse.detach(), TOLERANCE[torch.float32].out, "lse")
    grad_out = _randn(gen, *out.shape)
    grads = run_backward(grad_out, inputs, out, lse, case.causal)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, grad, ref_grad in zip(TENSORS, grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, TOLERANCE[torch.float32].grad, f"d{name}")


@pytest.mark.parametrize("T, expected", [(16, "_forward_decode"), (17, "_forward_general")])
def test_forward_picks_decode_path_for_short_queries(
    T: int, expected: str, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    for name in ("_forward_decode", "_forward_general"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    case = Case(1, 1, 1, T, T, 1, 1, 16, (0,), (1,), None, True)
    inputs = make_inputs(case, torch.float32, gen)
    out, _ = run_forward(kernels.forward, inputs, causal=True)
    assert calls == [expected]
    assert_close(out, reference(inputs, causal=True)[0], TOLERANCE[torch.float32].out, "out")


def test_rows_with_nothing_visible_are_zero_and_finite(gen: torch.Generator) -> None:
    case = CASES["empty_rows_p0"]
    inputs = make_inputs(case, torch.float16, gen)
    out, lse = run_forward(kernels.forward, inputs, case.causal)
    grad_out = _randn(gen, *out.shape, dtype=torch.float16)
    grads = run_backward(grad_out, inputs, out, lse, case.causal)
    # Row 0 (two left-padded keys, causal, S == T): queries 0 and 1 see nothing; row 1 sees nothing.
    empty = torch.zeros(case.B, case.T, dtype=torch.bool, device=DEVICE)
    empty[0, :2] = True
    empty[1] = True
    empty = empty[:, None, :].expand(case.B, case.Hq, case.T)
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))
    assert torch.all(torch.isfinite(out)) and torch.all(torch.isfinite(lse[~empty]))
    assert all(torch.all(torch.isfinite(g)) for g in grads)
    assert torch.all(grads[0][empty] == 0)


def restride(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` [A, H, L, D] in storage laid out [A, L, H, D + 3] (transposed, rows apart)."""
    storage = torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3] + 3, dtype=x.dtype, device=x.device)
    view = storage.transpose(1, 2)[..., : x.shape[3]]
    view.copy_(x)
    return view


@pytest.mark.parametrize("path", ["general", "decode"])
def test_noncontiguous_inputs_match_contiguous(path: str, gen: torch.Generator) -> None:
    case = CASES["mqa_pad_ragged"]
    dense = make_inputs(case, torch.float32, gen)
    strided = {name: restride(x) if name in TENSORS else x for name, x in dense.items()}
    fn = kernels._forward_general if path == "general" else kernels._forward_decode
    out, lse = run_forward(fn, dense, case.causal)
    out_s, lse_s = run_forward(fn, strided, case.causal)
    torch.testing.assert_close(out_s, out, atol=0, rtol=0)
    torch.testing.assert_close(lse_s, lse, atol=0, rtol=0)

    # A broadcast gradient (stride 0, as from out.sum()) and a transposed one.
    for grad_out in (_randn(gen, 1, 1, 1, case.D).expand_as(out), restride(_randn(gen, *out.shape))):
        grads = run_backward(grad_out.contiguous(), dense, out, lse, case.causal)
        grads_s = run_backward(grad_out, strided, restride(out), lse, case.causal)
        for name, g, g_s in zip(TENSORS, grads, grads_s, strict=True):
            torch.testing.assert_close(g_s, g, atol=0, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("case_name", ["mqa_pad_ragged", "empty_rows_p0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits_do_not_overflow(dtype: torch.dtype, case_name: str, gen: torch.Generator) -> None:
    case = CASES[case_name]
    inputs = make_inputs(case, dtype, gen)
    for name in ("q", "k", "prefix_k"):
        inputs[name] = inputs[name] * 20  # logits of several hundred: exp() overflows fp16 and fp32
    for fn in (kernels._forward_general, kernels._forward_decode):
        out, lse = run_forward(fn, inputs, case.causal)
        ref_out, ref_lse, _ = reference(inputs, case.causal)
        assert_close(out, ref_out, TOLERANCE[dtype].out, "out")
        assert_close(lse, ref_lse, TOLERANCE[torch.float32].out, "lse")  # |lse| ~ 1e3, relative: fp32 resolution
    grad_out = _randn(gen, *out.shape, dtype=dtype)
    grads = run_backward(grad_out, inputs, out, lse, case.causal)
    ref_grads, bounds = _flash_gradient_and_rounding_bound(inputs, case.causal, out, grad_out)
    for name, grad, ref_grad in zip(TENSORS, grads, ref_grads, strict=True):
        assert grad.shape == ref_grad.shape, name
        err = (grad.double() - ref_grad).abs()
        atol, rtol = SATURATED_GRAD_TOL[dtype]
        excess = err - atol - rtol * ref_grad.abs() - bounds.get(name, 0.0)
        assert (excess <= 0).all(), f"d{name}: error {err.max():.4g} is over the tolerance by {excess.max():.4g}"


# Saturated softmax: (atol, rtol) on top of the modelled elementwise rounding bound below, elementwise
# rather than over the scale of the gradient (whose largest entries dwarf the cancelling ones).
SATURATED_GRAD_TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (3e-2, 3e-2)}


def _flash_gradient_and_rounding_bound(inputs: dict, causal: bool, out: torch.Tensor, grad_out: torch.Tensor):
    """The float64 gradients a FlashAttention-style backward should give, and elementwise bounds on the
    rounding of dS that it cannot avoid; both matter where a saturated softmax makes dq and dk cancel.

    - The backward takes delta_i = rowsum(dO_i * O_i) from ``out``, the output rounded to the input dtype
      (as FlashAttention and SDPA's memory-efficient kernel do; PEFT's CPU math path does not). dS_ij =
      P_ij (dP_ij - delta_i), and an output gradient c_i on lse_i adds c_i P_ij to dS_ij, so the float64
      reference with c_i = -(delta_i(out) - delta_i(exact O)) is exactly that gradient.
    - dq = scale * dS @ K and dk = scale * dS^T @ Q multiply dS rounded to the input dtype (unit roundoff u),
      which adds at most scale * u * |dS| @ |K| to dq and scale * u * |dS|^T @ |Q| to dk; the latter is
      summed back onto k and prefix_k through the same expand-and-concatenate the reference uses.
    """
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out.dtype]
    ref_out, ref_lse, leaves = reference(inputs, causal, requires_grad=True)
    g = grad_out.double()
    shift = (g * out.double()).sum(-1) - (g * ref_out.detach()).sum(-1)
    shift = torch.where(torch.isinf(ref_lse.detach()), torch.zeros_like(shift), shift)  # rows seeing nothing
    ref_grads = torch.autograd.grad([ref_out, ref_lse], leaves, [g, -shift])

    q, k, v, pk, pv = (x.detach().clone().requires_grad_(name in ("k", "prefix_k")) for name, x in
                       zip(TENSORS, leaves, strict=True))
    k_all, v_all, visible = _expand_and_concat(_args(inputs, causal, 0.0, 0).with_inputs([q, k, v, pk, pv]))
    scale = q.shape[-1] ** -0.5
    logits = (scale * q @ k_all.detach().transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, -1, keepdim=True)
    probs = torch.where(torch.isinf(lse), torch.zeros_like(logits), torch.exp(logits - lse))
    dp = g @ v_all.detach().transpose(-1, -2)
    ds = probs * (dp - (g * out.double()).sum(-1, keepdim=True))
    weights = u * ds.abs()
    bound_q = scale * weights @ k_all.detach().abs()
    bound_k, bound_pk = torch.autograd.grad(((weights @ k_all) * q.abs()).sum(), [k, pk])
    return ref_grads, {"q": bound_q, "k": scale * bound_k, "prefix_k": scale * bound_pk}


# ----------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------

DROPOUT_CASE = CASES["mqa_pad_ragged"]


def test_dropout_is_deterministic_and_paths_agree(gen: torch.Generator) -> None:
    inputs = make_inputs(DROPOUT_CASE, torch.float32, gen)
    args = dict(causal=True, dropout_p=0.3, seed=1234)
    out_a, lse_a = run_forward(kernels._forward_general, inputs, **args)
    out_b, _ = run_forward(kernels._forward_general, inputs, **args)
    torch.testing.assert_close(out_b, out_a, atol=0, rtol=0)
    # The decode path draws the same mask: same (b, hq, t, column) -> same keep decision.
    out_d, lse_d = run_forward(kernels._forward_decode, inputs, **args)
    assert_close(out_d, out_a, TOLERANCE[torch.float32].out, "decode vs general out")
    # lse is that of the un-dropped probabilities.
    assert_close(lse_a, reference(inputs, causal=True)[1], TOLERANCE[torch.float32].out, "lse")
    out_c, _ = run_forward(kernels._forward_general, inputs, causal=True, dropout_p=0.3, seed=1235)
    assert not torch.allclose(out_c, out_a)


@pytest.mark.parametrize("path", ["general", "decode"])
def test_dropout_keeps_one_minus_p_and_rescales(path: str, gen: torch.Generator) -> None:
    # One-hot values (prefix column j -> e_j, sequence column s -> e_{P+s}) make out[..., c] the
    # dropped, rescaled probability of column c.
    case = Case(2, 4, 2, 16, 16, 5, 1, 32, (0, 0), (5,), None, False)
    inputs = make_inputs(case, torch.float32, gen)
    cols = case.P + case.S
    eye = torch.eye(case.D, device=DEVICE)
    inputs["prefix_v"] = eye[: case.P].expand(case.N, case.Hkv, case.P, case.D)
    inputs["v"] = eye[case.P : cols].expand(case.B, case.Hkv, case.S, case.D)
    p = 0.3
    fn = kernels._forward_general if path == "general" else kernels._forward_decode
    out, _ = run_forward(fn, inputs, causal=False, dropout_p=p, seed=99)
    probs = reference(inputs, causal=False)[0][..., :cols]
    out = out[..., :cols]
    kept = out != 0
    assert torch.all(probs > 0)  # every column visible, so a zero can only be a drop
    assert abs(kept.double().mean().item() - (1 - p)) < 0.04  # 2048 draws: ~5 standard deviations
    assert_close(out[kept], probs[kept] / (1 - p), TOLERANCE[torch.float32].out, "kept probabilities")


def test_dropout_backward_uses_the_forward_mask(gen: torch.Generator) -> None:
    case = DROPOUT_CASE
    inputs = make_inputs(case, torch.float32, gen)
    args = dict(causal=case.causal, dropout_p=0.25, seed=4321)
    out, lse = run_forward(kernels.forward, inputs, **args)
    grad_out = _randn(gen, *out.shape)
    dq, dk, dv, dpk, dpv = run_backward(grad_out, inputs, out, lse, **args)

    # For a fixed mask, out is linear in (v, prefix_v): <grad_out, out> = <dv, v> + <dprefix_v, prefix_v>.
    lhs = (grad_out.double() * out.double()).sum()
    rhs = (dv.double() * inputs["v"].double()).sum() + (dpv.double() * inputs["prefix_v"].double()).sum()
    assert_close(rhs, lhs, TOLERANCE[torch.float32].out, "<dv, v> + <dprefix_v, prefix_v>")

    # Directional derivative along random (u_q, u_k, u_prefix_k), central differences in fp32.
    directions = {name: _randn(gen, *inputs[name].shape) for name in ("q", "k", "prefix_k")}
    eps = 1e-2

    def loss(sign: float) -> float:
        moved = {**inputs, **{n: inputs[n] + sign * eps * u for n, u in directions.items()}}
        return (grad_out.double() * run_forward(kernels.forward, moved, **args)[0].double()).sum().item()

    numeric = (loss(1.0) - loss(-1.0)) / (2 * eps)
    analytic = sum((g.double() * directions[n].double()).sum().item() for n, g in
                   (("q", dq), ("k", dk), ("prefix_k", dpk)))
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic))
