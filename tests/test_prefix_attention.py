"""fastprompt.prefix_attention on every backend against the float64 oracle (concatenate, mask, softmax)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastprompt
from fastprompt.attention import AttentionArgs, available_backends, cpu_cascade
from fastprompt.attention.cases import TOLERANCE, Case, make_case, max_error, scale_of
from fastprompt.attention.reference import naive_prefix_attention, reference_prefix_attention
from fastprompt.errors import BackendUnavailableError

CUDA = torch.cuda.is_available()

def _expected_here(backend: str) -> bool:
    """Whether this machine has what the backend needs, so that being unavailable is a failure."""
    if backend == "cpu":
        return shutil.which("c++") is not None or shutil.which("g++") is not None
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    return True


def _device_for(backend: str) -> str:
    return "cpu" if backend == "cpu" or not CUDA else "cuda"


# The cpu backend has two routes, chosen per call by shape (cpu_cascade.runs_forward / runs_backward); the
# tests' shapes are small, so each test runs the cpu backend once per route, forced.
CPU_ROUTES = ("cpu-cascade", "cpu-kernel")


def _use(name: str, monkeypatch) -> str:
    """Select backend ``name`` (a route of the cpu backend names it); returns the backend's own name."""
    backend = "cpu" if name in CPU_ROUTES else name
    monkeypatch.setenv("FASTPROMPT_BACKEND", backend)
    if backend == "cpu":
        cascade = name == "cpu-cascade"
        monkeypatch.setattr(cpu_cascade, "runs_forward", lambda args: cascade)
        monkeypatch.setattr(cpu_cascade, "runs_backward", lambda args: cascade)
    return backend


def _cpu_tensor_backends() -> list[str]:
    """The torch backend and the cpu backend's routes that run here; a missing one fails unless this machine
    lacks what it needs."""
    names = []
    for name in ("torch", "cpu"):
        ok, reason = available_backends("cpu")[name]
        assert ok or not _expected_here(name), reason
        if ok:
            names.extend(CPU_ROUTES if name == "cpu" else [name])
    return names


@pytest.fixture(params=["torch", *CPU_ROUTES, "triton"])
def backend(request, monkeypatch) -> str:
    name = "cpu" if request.param in CPU_ROUTES else request.param
    ok, reason = available_backends(_device_for(name))[name]
    if not ok:
        if _expected_here(name):
            pytest.fail(f"backend {name} should be available here but is not: {reason}")
        pytest.skip(f"backend {name} unavailable: {reason}")
    return _use(request.param, monkeypatch)


def check_against_reference(
    case: Case, *, with_lse_grad: bool = True, grads_no_worse_than_naive: bool = False,
    delta_from_rounded_out: bool = False,
) -> None:
    """Outputs, lse and the gradients of all five inputs against the float64 oracle.

    ``grads_no_worse_than_naive``: a gradient may also be off by up to twice the error of the naive path
    (PEFT's, in the inputs' dtype) on the same inputs.
    ``delta_from_rounded_out``: the gradients' oracle is that of a backward that takes delta_i = rowsum(dO_i * O_i)
    from ``out`` as returned (rounded to the inputs' dtype), as FlashAttention-style backwards do. Since
    dS_ij = P_ij (dP_ij - delta_i) and a gradient c_i on lse_i adds c_i P_ij to dS_ij, that is the float64
    gradient with c_i lowered by delta_i(out) - delta_i(exact output).
    """
    tol_out, tol_grad = TOLERANCE[case.q.dtype]
    out, lse = fastprompt.prefix_attention(*case.tensors, **case.options, return_lse=True)
    ref_out, ref_lse = reference_prefix_attention(case.record())
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert lse.dtype == torch.float32 and lse.shape == case.q.shape[:-1]
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows with nothing to attend to differ"
    assert max_error(out, ref_out) <= tol_out * scale_of(ref_out)
    lse_tol = max(tol_out, TOLERANCE[torch.float32][0])  # the lse is float32 whatever the input dtype
    assert max_error(lse, ref_lse) <= lse_tol * scale_of(ref_lse)

    grad_out = torch.randn_like(ref_out).to(out.dtype).double()  # the op's output gradient is in its dtype
    grad_lse = torch.randn_like(ref_lse) if with_lse_grad else torch.zeros_like(ref_lse)
    ref_grad_lse = grad_lse
    if delta_from_rounded_out:
        shift = (grad_out * out.double()).sum(-1) - (grad_out * ref_out).sum(-1)
        ref_grad_lse = grad_lse - torch.where(torch.isinf(ref_lse), 0, shift).detach()

    def loss(o, l, gl):  # noqa: E741
        return (o.double() * grad_out).sum() + (torch.where(torch.isinf(l), 0, l).double() * gl).sum()

    if with_lse_grad:
        grads = torch.autograd.grad(loss(out, lse, grad_lse), case.tensors)
    else:  # the lse stays inside the op, as in training: no gradient can reach it
        out_only = fastprompt.prefix_attention(*case.tensors, **case.options)
        grads = torch.autograd.grad((out_only.double() * grad_out).sum(), case.tensors)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse, ref_grad_lse), case.tensors)
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    floor = dict.fromkeys(names, 0.0)
    if grads_no_worse_than_naive:
        naive_inputs = [x.detach().requires_grad_(True) for x in case.tensors]
        naive_out = naive_prefix_attention(case.record().with_inputs(naive_inputs))
        naive_grads = torch.autograd.grad((naive_out.double() * grad_out).sum(), naive_inputs)
        floor = {n: 2 * max_error(g, r) for n, g, r in zip(names, naive_grads, ref_grads, strict=True)}
    for name, g, ref, x in zip(names, grads, ref_grads, case.tensors, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"
        err, bound = max_error(g, ref), max(tol_grad * scale_of(ref), floor[name])
        assert err <= bound, f"gradient of {name}: max error {err:.3g} > {bound:.3g}"


# --- against the oracle --------------------------------------------------------------------------------


@st.composite
def shapes(draw, small: bool):
    Hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 4] if small else [1, 4, 8]))
    T = draw(st.integers(1, 6 if small else 17))
    S = T + draw(st.integers(0, 5 if small else 12))
    N = draw(st.integers(1, 3))
    P = draw(st.integers(0, 12 if small else 40))
    B = draw(st.integers(1, 3))
    prefix_index = draw(st.lists(st.integers(-1, N - 1), min_size=B, max_size=B))
    ragged = draw(st.booleans())
    prefix_lens = draw(st.lists(st.integers(0, P), min_size=N, max_size=N)) if ragged else None
    return {
        "B": B,
        "Hq": Hkv * group,
        "Hkv": Hkv,
        "T": T,
        "S": S,
        "P": P,
        "N": N,
        "D": draw(st.sampled_from([32, 80])),
        "prefix_index": prefix_index,
        "prefix_lens": prefix_lens,
        "padding": draw(st.sampled_from([None, "left", "right"])),
        "causal": draw(st.booleans()),
    }


def _hypothesis(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))


@_hypothesis(max_examples=25)
@given(shape=shapes(small=False), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_cpu_backends(shape, seed, monkeypatch):
    for name in _cpu_tensor_backends():
        _use(name, monkeypatch)
        for with_lse_grad in (True, False):
            case = make_case(**shape, generator=torch.Generator().manual_seed(seed))
            check_against_reference(case, with_lse_grad=with_lse_grad)


@pytest.mark.skipif(not _expected_here("triton"), reason="triton is not installed")
@_hypothesis(max_examples=6 if not CUDA else 40)
@given(shape=shapes(small=not CUDA), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_triton(shape, seed, monkeypatch):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    device = _device_for("triton")
    check_against_reference(make_case(**shape, device=device, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param({"T": 1, "S": 1, "P": 0}, id="T1-no-prefix"),
        pytest.param({"T": 1, "S": 9, "P": 5}, id="decode-with-cache"),
        pytest.param({"T": 7, "S": 11, "P": 3, "B": 3, "padding": "left"}, id="odd-cache-left-pad"),
        pytest.param({"T": 4, "S": 4, "P": 300, "N": 2, "prefix_index": [1, 0], "prefix_lens": [300, 129]}, id="P300"),
        pytest.param(
            {"B": 4, "N": 3, "P": 9, "prefix_index": [2, -1, 2, 0], "prefix_lens": [0, 4, 9]}, id="bank-repeats-none"
        ),
        pytest.param({"Hq": 8, "Hkv": 1, "T": 3, "P": 4}, id="MQA"),
        pytest.param({"Hq": 16, "Hkv": 2, "T": 3, "P": 4}, id="GQA8"),
        pytest.param({"T": 6, "S": 6, "P": 5, "causal": False, "padding": "right"}, id="bidirectional-right-pad"),
        pytest.param({"D": 96, "T": 3, "P": 3}, id="D96"),
    ],
)
@pytest.mark.parametrize("with_lse_grad", [True, False], ids=["lse-grad", "no-lse-grad"])
def test_fixed_shapes(shape, with_lse_grad, backend):
    check_against_reference(make_case(**shape, device=_device_for(backend)), with_lse_grad=with_lse_grad)


@pytest.mark.parametrize("with_lse_grad", [True, False], ids=["lse-grad", "no-lse-grad"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype, with_lse_grad, backend):
    case = make_case(B=2, T=6, S=8, P=7, N=2, prefix_index=[1, 0], dtype=dtype, device=_device_for(backend))
    check_against_reference(case, with_lse_grad=with_lse_grad)


@pytest.mark.parametrize("with_lse_grad", [True, False], ids=["lse-grad", "no-lse-grad"])
def test_float64(with_lse_grad, monkeypatch):
    for name in _cpu_tensor_backends():
        _use(name, monkeypatch)
        case = make_case(dtype=torch.float64, P=4, T=3, S=5, padding="left")
        check_against_reference(case, with_lse_grad=with_lse_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_logits_do_not_overflow(dtype, backend):
    # q.k reaches ~1e4 here: far beyond fp16's exp range if the softmax were not done in fp32 with a running max
    case = make_case(T=4, S=4, P=3, magnitude=12.0, dtype=dtype, device=_device_for(backend))
    out = fastprompt.prefix_attention(*case.tensors, **case.options)
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().sum(), case.tensors)
    assert all(torch.isfinite(g).all() for g in grads)
    if backend == "triton" and dtype == torch.bfloat16:
        # Known limit, stated in the README: like FlashAttention, the triton backward takes
        # delta = rowsum(dO * O) from the output rounded to bf16; with a saturated softmax dq and dk are
        # small differences of large terms and inherit that rounding. Outputs and lse are still exact.
        out, lse = fastprompt.prefix_attention(*case.tensors, **case.options, return_lse=True)
        ref_out, ref_lse = reference_prefix_attention(case.record())
        tol_out, _ = TOLERANCE[dtype]
        assert max_error(out, ref_out) <= tol_out * scale_of(ref_out)
        assert max_error(lse, ref_lse) <= tol_out * scale_of(ref_lse)
        return
    # With a saturated softmax, dq and dk cancel to almost nothing while the terms that cancel are large,
    # so half-precision rounding of those terms dominates. The C++ backward computes in fp32 but takes
    # delta from the output rounded to the dtype: that rounding alone moves dq and dk by up to about their own
    # scale (1.5x for dprefix_k in bf16 over 40 seeds), everything else stays within a tenth of the
    # tolerance, so it is held to the oracle of that rounding model. The torch backend recomputes the forward
    # in fp32; its gradients are held to PEFT's path in the same dtype.
    if backend == "cpu":
        check_against_reference(case, with_lse_grad=False, delta_from_rounded_out=True)
    else:
        check_against_reference(case, with_lse_grad=False, grads_no_worse_than_naive=True)


def test_rows_with_nothing_to_attend_give_zeros(backend):
    device = _device_for(backend)
    case = make_case(B=3, T=3, S=5, N=1, P=4, prefix_index=[-1, 0, -1], prefix_lens=[0], device=device)
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[0] = False  # row 0: no prefix, no keys at all
    mask[2, :3] = False  # row 2: its first causal query sees keys 0..2, all padding
    case.options["key_padding_mask"] = mask
    out = fastprompt.prefix_attention(*case.tensors, **case.options)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2, :, 0], torch.zeros_like(out[2, :, 0]))
    assert (out[2, :, 1:].abs().sum(-1) > 0).all() and (out[1].abs().sum(-1) > 0).all()
    check_against_reference(case)


def test_non_contiguous_inputs(backend, seed):
    device = _device_for(backend)
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, S, P, D = 2, 4, 2, 5, 7, 6, 32

    def bthd(*shape):  # the [B, T, H, D] layout that transformers projections produce, viewed as [B, H, T, D]
        b, h, t, d = shape
        return torch.randn(b, t, h, d, generator=g).to(device).transpose(1, 2).requires_grad_(True)

    pk = torch.randn(1, Hkv, D, P, generator=g).to(device).transpose(2, 3).requires_grad_(True)
    pv = torch.randn(1, Hkv, D, P, generator=g).to(device).transpose(2, 3).requires_grad_(True)
    case = Case(bthd(B, Hq, T, D), bthd(B, Hkv, S, D), bthd(B, Hkv, S, D), pk, pv, {"causal": True})
    assert not any(x.is_contiguous() for x in case.tensors)
    check_against_reference(case)


def test_no_index_tensors_in_inference_mode_then_training(backend):
    """Without prefix_index / prefix_lens every backend takes "row 0, full length" directly: a served call
    and a training call on the same inputs agree, and the training call matches the oracle."""
    device = _device_for(backend)
    case = make_case(B=3, T=4, P=5, device=device)
    with torch.inference_mode():
        served = fastprompt.prefix_attention(*[x.detach() for x in case.tensors], **case.options)
    check_against_reference(case)
    assert torch.equal(served, fastprompt.prefix_attention(*case.tensors, **case.options).detach())


def test_backend_argument_overrides_the_environment_and_pins_the_backward(monkeypatch):
    from fastprompt.attention import cpu_backend, torch_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the backward ran on another backend than the forward")

    case = make_case(B=2, T=4, P=3)
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu")
    monkeypatch.setattr(cpu_backend, "forward", refuse)
    out = fastprompt.prefix_attention(*case.tensors, **case.options, backend="torch")
    monkeypatch.setattr(cpu_backend, "backward", refuse)
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")  # changed between forward and backward
    grads = torch.autograd.grad(out.sum(), case.tensors)
    monkeypatch.setattr(torch_backend, "backward", refuse)
    out = fastprompt.prefix_attention(*case.tensors, **case.options, backend="torch")
    with pytest.raises(AssertionError, match="another backend"):
        torch.autograd.grad(out.sum(), case.tensors)
    assert all(torch.isfinite(g).all() for g in grads)


def test_auto_falls_back_to_the_next_backend_with_a_warning(monkeypatch):
    from fastprompt.attention import cpu_backend

    monkeypatch.setattr(cpu_backend, "available", lambda: (False, "no C++ compiler found"))
    case = make_case(B=2, T=3, P=4)
    message = r"the cpu backend cannot run these cpu tensors \(no C\+\+ compiler found\); using torch"
    with pytest.warns(RuntimeWarning, match=message):
        assert fastprompt.resolve_backend("cpu", torch.float32, 32, backend="auto") == "torch"
    with pytest.warns(RuntimeWarning, match=message):
        out = fastprompt.prefix_attention(*case.tensors, **case.options, backend="auto")
    expected = fastprompt.prefix_attention(*case.tensors, **case.options, backend="torch")
    assert torch.equal(out, expected)


def test_a_named_backend_that_cannot_run_lists_every_backends_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case(dtype=torch.float64)
    with pytest.raises(BackendUnavailableError) as error:
        fastprompt.prefix_attention(*case.tensors, **case.options, backend="triton")
    message = str(error.value)
    assert "backend triton cannot run these tensors here" in message
    assert "supports float16, bfloat16, float32, got float64" in message
    assert "torch: can run" in message and "cpu: " in message
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cpu, torch; got 'fast'"):
        fastprompt.prefix_attention(*case.tensors, **case.options, backend="fast")


def test_dropout(backend, seed):
    device = _device_for(backend)
    case = make_case(B=2, T=8, S=8, P=8, N=1, device=device)
    p = 0.3
    torch.manual_seed(seed)
    out_a = fastprompt.prefix_attention(*case.tensors, dropout_p=p, **case.options)
    torch.manual_seed(seed)
    out_b = fastprompt.prefix_attention(*case.tensors, dropout_p=p, **case.options)
    assert torch.equal(out_a, out_b), "the same torch seed must give the same dropout mask"
    assert not torch.allclose(out_a, fastprompt.prefix_attention(*case.tensors, **case.options))

    # For a fixed mask, out is linear in v and prefix_v: <g, out> = <dv, v> + <dprefix_v, prefix_v>,
    # which holds only if backward applies exactly the forward's mask.
    grad_out = torch.randn_like(out_a)
    dv, dpv = torch.autograd.grad(out_a, [case.v, case.prefix_v], grad_out)
    lhs = (grad_out.double() * out_a.double()).sum()
    rhs = (dv.double() * case.v.double()).sum() + (dpv.double() * case.prefix_v.double()).sum()
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs.item()))

    # Kept probabilities are rescaled by 1 / (1 - p): with constant values the output averages that constant.
    big = make_case(B=4, Hq=4, Hkv=2, T=16, S=16, P=16, device=device)
    out = fastprompt.prefix_attention(
        big.q, big.k, torch.ones_like(big.v), big.prefix_k, torch.ones_like(big.prefix_v), dropout_p=p
    )
    assert abs(out.mean().item() - 1.0) < 0.05


def test_dropout_directional_derivative(backend, seed):
    # d/de L(q + e*u) at e=0 equals <dq, u> for a fixed dropout mask (finite differences, same seed).
    device = _device_for(backend)
    case = make_case(B=1, T=4, S=4, P=3, device=device, dtype=torch.float32)
    u = torch.randn_like(case.q)
    grad_out = torch.randn_like(case.q)

    def loss(q):
        torch.manual_seed(seed)
        out = fastprompt.prefix_attention(q, *case.tensors[1:], dropout_p=0.25, **case.options)
        return (out.double() * grad_out).sum()

    (dq,) = torch.autograd.grad(loss(case.q), [case.q])
    eps = 1e-2
    with torch.no_grad():
        numeric = (loss(case.q + eps * u) - loss(case.q - eps * u)) / (2 * eps)
    analytic = (dq.double() * u).sum()
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic.item()))


# --- properties of the op that do not depend on a backend ---------------------------------------------


@pytest.mark.parametrize("forward_route", CPU_ROUTES)
def test_cpu_routes_mix_between_forward_and_backward(forward_route, monkeypatch):
    """The cpu backend picks the forward's and the backward's route separately: either backward takes either
    forward's out and lse."""
    if not available_backends("cpu")["cpu"][0]:
        assert not _expected_here("cpu")
        pytest.skip("cpu backend unavailable")
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu")
    cascade_forward = forward_route == "cpu-cascade"
    monkeypatch.setattr(cpu_cascade, "runs_forward", lambda args: cascade_forward)
    monkeypatch.setattr(cpu_cascade, "runs_backward", lambda args: not cascade_forward)
    for causal in (True, False):
        case = make_case(B=3, Hq=4, Hkv=2, T=6, S=9, P=5, N=2, prefix_index=[1, -1, 0], padding="left", causal=causal)
        check_against_reference(case, with_lse_grad=False)


def test_cpu_routes_follow_the_declared_thresholds():
    """Which route each kind of call takes: the cascade on long bidirectional rows and wide decode batches."""

    def args(B, Hq, Hkv, T, S, causal=True):
        case = make_case(B=B, Hq=Hq, Hkv=Hkv, T=T, S=S, P=4, D=32, causal=causal)
        return AttentionArgs(*case.tensors, causal=causal)

    many, few = cpu_cascade.FORWARD_MIN_KEYS, cpu_cascade.FORWARD_MIN_KEYS // 2
    assert cpu_cascade.runs_forward(args(1, 2, 2, many, many, causal=False))
    assert not cpu_cascade.runs_forward(args(1, 2, 2, few, few, causal=False))
    assert not cpu_cascade.runs_forward(args(1, 2, 2, 4 * many, 4 * many))  # causal: the C++ kernel
    long = cpu_cascade.BACKWARD_MIN_KEYS
    assert cpu_cascade.runs_backward(args(1, 2, 2, long, long, causal=False))
    assert not cpu_cascade.runs_backward(args(1, 2, 2, long // 2, long // 2, causal=False))
    assert not cpu_cascade.runs_backward(args(1, 2, 2, long, long))
    # decode: the cascade only for groups up to DECODE_MAX_GROUP heads with DECODE_MIN_KEYS keys in the batch
    keys, group = cpu_cascade.DECODE_MIN_KEYS, cpu_cascade.DECODE_MAX_GROUP
    assert cpu_cascade.runs_forward(args(4, group, 1, 1, keys // 4))
    assert not cpu_cascade.runs_forward(args(4, group, 1, 1, keys // 8))
    assert not cpu_cascade.runs_forward(args(4, 2 * group, 1, 1, keys))


def test_merge_attention_states_equals_attention_over_the_union():
    case = make_case(B=2, T=5, S=9, P=0, causal=False)
    q, k, v = case.q.double(), case.k.double(), case.v.double()
    empty = case.prefix_k.double()
    whole, whole_lse = reference_prefix_attention(AttentionArgs(q, k, v, empty, empty, causal=False))
    a, a_lse = reference_prefix_attention(AttentionArgs(q, k[:, :, :4], v[:, :, :4], empty, empty, causal=False))
    b, b_lse = reference_prefix_attention(AttentionArgs(q, k[:, :, 4:], v[:, :, 4:], empty, empty, causal=False))
    out, lse = fastprompt.merge_attention_states(a, a_lse, b, b_lse)
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)
    none = torch.full_like(a_lse, float("-inf"))
    out, lse = fastprompt.merge_attention_states(a, none, b, none)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    with pytest.raises(ValueError, match="lse_a and lse_b must have shape"):
        fastprompt.merge_attention_states(a, a_lse[..., :2], b, b_lse)


def test_torch_compile_fullgraph_traces_the_op(monkeypatch):
    monkeypatch.setenv("FASTPROMPT_BACKEND", "torch")
    case = make_case(B=2, N=2, P=5, prefix_index=[1, 0], prefix_lens=[5, 3])

    def attend(q, k, v, pk, pv):
        return fastprompt.prefix_attention(q, k, v, pk, pv, **case.options).sum()

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*case.tensors), attend(*case.tensors))
    grads = torch.autograd.grad(compiled(*case.tensors), case.tensors)
    expected = torch.autograd.grad(attend(*case.tensors), case.tensors)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", [*CPU_ROUTES, "torch"])
def test_prefix_is_not_copied_per_row(name, monkeypatch):
    # One expanded copy of the prefix (what the naive path makes) would need B * Hkv * P * D * 4 bytes.
    from fastprompt.bench.timing import _cpu_peak_bytes

    backend = "cpu" if name in CPU_ROUTES else name
    if not available_backends("cpu")[backend][0]:
        assert not _expected_here(backend)
        pytest.skip(f"{backend} backend unavailable")
    _use(name, monkeypatch)
    B, Hkv, P, D = 16, 2, 1024, 64
    case = make_case(B=B, Hq=2, Hkv=Hkv, T=1, S=2, P=P, D=D)
    expanded_bytes = B * Hkv * P * D * 4
    forward = _cpu_peak_bytes(lambda: fastprompt.prefix_attention(*case.tensors, **case.options))
    assert forward < expanded_bytes / 4
    out = fastprompt.prefix_attention(*case.tensors, **case.options)
    backward = _cpu_peak_bytes(lambda: torch.autograd.grad(out, case.tensors, torch.ones_like(out), retain_graph=True))
    # the gradients themselves (dq, dk, dv, dprefix_k, dprefix_v) are unavoidable: 2 prefix-sized buffers
    assert backward < 2 * Hkv * P * D * 4 + expanded_bytes / 4


# --- backend selection and bad input ------------------------------------------------------------------


def test_backend_selection_errors(monkeypatch):
    case = make_case()
    monkeypatch.setenv("FASTPROMPT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTPROMPT_BACKEND must be one of"):
        fastprompt.prefix_attention(*case.tensors)
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not CUDA:
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            fastprompt.prefix_attention(*case.tensors)
    if _expected_here("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(BackendUnavailableError, match="got float64"):
            fastprompt.prefix_attention(*[x.double() for x in case.tensors], **case.options)
        wide = make_case(D=272, T=1, S=1, P=1, B=1)
        with pytest.raises(BackendUnavailableError, match="head dims up to 256, got 272"):
            fastprompt.prefix_attention(*wide.tensors, **wide.options)


def _bad(**changes):
    case = make_case(B=2, Hq=4, Hkv=2, T=3, S=5, P=4, N=2)
    args = dict(zip(["q", "k", "v", "prefix_k", "prefix_v"], case.tensors, strict=True))
    args["prefix_index"] = torch.tensor([0, 1])
    args.update(changes)
    return args


BAD_INPUTS = [
    ({"q": torch.randn(2, 4, 3, 16)}, ValueError, "head dims differ"),
    ({"q": torch.randn(2, 3, 3, 32)}, ValueError, "multiple of"),
    (
        {"k": torch.randn(2, 3, 5, 32), "v": torch.randn(2, 3, 5, 32)},
        ValueError,
        "prefix_k has 2 heads but k has Hkv=3",
    ),
    ({"v": torch.randn(2, 2, 6, 32)}, ValueError, "k and v must have the same shape"),
    ({"k": torch.randn(2, 2, 2, 32), "v": torch.randn(2, 2, 2, 32)}, ValueError, "S >= T"),
    ({"k": torch.randn(3, 2, 5, 32), "v": torch.randn(3, 2, 5, 32)}, ValueError, "k has batch size 3"),
    ({"q": torch.randn(2, 4, 32)}, ValueError, "q must have 4 dimensions"),
    ({"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
    ({"q": torch.ones(2, 4, 3, 32, dtype=torch.int32)}, TypeError, "q must be float16, bfloat16, float32 or float64"),
    ({"k": torch.randn(2, 2, 5, 32, dtype=torch.float64)}, TypeError, "k has dtype torch.float64"),
    ({"prefix_index": torch.tensor([0, 2])}, ValueError, r"prefix_index values must be in \[-1, N\)"),
    ({"prefix_index": torch.tensor([-2, 0])}, ValueError, r"prefix_index values must be in \[-1, N\)"),
    ({"prefix_index": torch.tensor([2**32, 0])}, ValueError, r"prefix_index values must be in \[-1, N\)"),
    ({"prefix_lens": torch.tensor([2**32 + 2, 3])}, ValueError, r"prefix_lens values must be in \[0, P\]"),
    ({"q": torch.randn(2, 0, 3, 32)}, ValueError, "must be a positive multiple"),
    ({"prefix_index": torch.tensor([0.0, 1.0])}, TypeError, "prefix_index must be an integer tensor"),
    ({"prefix_index": torch.tensor([0, 1, 1])}, ValueError, r"prefix_index must have shape \[B\]"),
    ({"prefix_index": None}, ValueError, "prefix_index is required"),
    ({"prefix_lens": torch.tensor([4, 5])}, ValueError, r"prefix_lens values must be in \[0, P\]"),
    ({"prefix_lens": torch.tensor([4])}, ValueError, r"prefix_lens must have shape \[N\]"),
    (
        {"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)},
        ValueError,
        r"key_padding_mask must have shape \[B, S\]",
    ),
    ({"key_padding_mask": torch.ones(2, 5)}, TypeError, "key_padding_mask must be bool"),
    ({"scale": -1.0}, ValueError, "scale must be a positive finite float"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\)"),
    ({"causal": "yes"}, TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_error(changes, error, message):
    args = _bad(**changes)
    tensors = [args.pop(name) for name in ["q", "k", "v", "prefix_k", "prefix_v"]]
    with pytest.raises(error, match=message):
        fastprompt.prefix_attention(*tensors, **args)


@pytest.mark.parametrize("shape", [(0, 4, 3, 2, 5, 32), (2, 4, 3, 2, 5, 0)], ids=["B0", "D0"])
def test_empty_batch_or_head_dim_is_rejected(shape):
    B, Hq, T, Hkv, S, D = shape
    tensors = [torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)]
    tensors += [torch.randn(1, Hkv, 4, D), torch.randn(1, Hkv, 4, D)]
    with pytest.raises(ValueError, match="batch size and a head dim of at least 1"):
        fastprompt.prefix_attention(*tensors)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device to put tensors on two devices")
def test_tensors_on_different_devices_are_rejected():
    args = _bad(k=torch.randn(2, 2, 5, 32, device="cuda"))
    tensors = [args.pop(name) for name in ["q", "k", "v", "prefix_k", "prefix_v"]]
    with pytest.raises(ValueError, match="k is on cuda"):
        fastprompt.prefix_attention(*tensors, **args)


def test_index_on_another_device_is_rejected():
    args = _bad(prefix_index=torch.tensor([0, 1], device="meta"))
    tensors = [args.pop(name) for name in ["q", "k", "v", "prefix_k", "prefix_v"]]
    with pytest.raises(ValueError, match="prefix_index is on meta but q is on cpu"):
        fastprompt.prefix_attention(*tensors, **args)


def test_resolvers_and_index_check_name_bad_arguments():
    from fastprompt.encoders import resolve_encoder_backend

    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype, got 'float16'"):
        fastprompt.resolve_backend("cpu", "float16")
    assert resolve_encoder_backend(None, "cpu", torch.float32) == "torch"  # a device given by name
    with pytest.raises(TypeError, match=r"prefix_index must be a torch.Tensor, got list"):
        fastprompt.check_index_values([0, 1], None, 2, 4)
    with pytest.raises(TypeError, match=r"prefix_lens must be an integer tensor, got torch.float32"):
        fastprompt.check_index_values(None, torch.tensor([1.0]), 1, 4)
    with pytest.raises(ValueError, match=r"prefix_lens values must be in \[0, P\]"):
        fastprompt.check_index_values(None, torch.tensor([5]), 1, 4)
