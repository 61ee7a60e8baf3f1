"""The ``cpu`` backend's build and kernels (``fastprompt._cpp``, ``csrc/``).

Only what is specific to the C++ build lives here: it compiles and registers its ops, reports why when
it cannot build, covers every dtype (fp64 included) against the float64 oracle, and its dropout
backward matches its dropout forward. The op-level matrix over all backends is
``tests/test_prefix_attention.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fastprompt.attention import cpu_backend as _cpp
from fastprompt.attention.reference import reference_prefix_attention

# Absolute and relative tolerance per dtype, for out and for the five gradients.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    ok, reason = _cpp.available()
    assert ok, reason


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ops_are_registered_with_the_contract_schema() -> None:
    fwd = str(torch.ops.fastprompt.prefix_attention_fwd_cpu.default._schema)
    bwd = str(torch.ops.fastprompt.prefix_attention_bwd_cpu.default._schema)
    assert "Tensor? key_padding_mask, bool causal, float scale, float dropout_p, int seed" in fwd
    assert fwd.endswith("-> (Tensor, Tensor)")
    assert "Tensor out, Tensor lse, Tensor? grad_lse, bool causal" in bwd
    assert bwd.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def test_missing_compiler_is_reported_not_raised(tmp_path) -> None:
    result = _run_python(
        """
        from fastprompt.attention import cpu_backend as _cpp
        from fastprompt.errors import BackendUnavailableError
        ok, reason = _cpp.available()
        print(ok, reason)
        try:
            _cpp.load()
        except BackendUnavailableError as error:
            print("raised:", error)
        """,
        CXX="/nonexistent/c++",
        FASTPROMPT_BUILD_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "False no C++ compiler found (CXX='/nonexistent/c++'" in result.stdout
    assert "raised: fastprompt cpu backend unavailable: no C++ compiler found" in result.stdout


def test_failed_build_reports_compiler_output_once(tmp_path) -> None:
    # Answers version queries like the real compiler, fails on every source file.
    compiler = tmp_path / "broken-c++"
    compiler.write_text(
        "#!/bin/sh\n"
        'case "$*" in *.cpp*) echo "broken compiler says no" >&2; exit 1;; esac\n'
        f'exec {shutil.which("c++")} "$@"\n'
    )
    compiler.chmod(0o755)
    result = _run_python(
        """
        from torch.utils import cpp_extension
        from fastprompt.attention import cpu_backend as _cpp
        from fastprompt.errors import BackendUnavailableError
        calls = []
        real_load = cpp_extension.load
        cpp_extension.load = lambda *a, **k: calls.append(1) or real_load(*a, **k)
        first = _cpp.available()
        second = _cpp.available()
        try:
            _cpp.load()
        except BackendUnavailableError as error:
            print("raised:", "broken compiler says no" in str(error))
        print("builds:", len(calls), "same:", first == second, "ok:", first[0])
        print(first[1])
        """,
        CXX=str(compiler),
        FASTPROMPT_BUILD_DIR=str(tmp_path / "build"),
    )
    assert result.returncode == 0, result.stderr
    assert "raised: True" in result.stdout
    assert "builds: 1 same: True ok: False" in result.stdout
    assert "broken compiler says no" in result.stdout
    assert "fastprompt: compiling CPU kernels (first use, about a minute)..." in result.stderr


def _inputs(dtype, B, Hq, Hkv, T, S, N, P, D, prefix_index, prefix_lens, padded_keys, strided):
    """Random inputs; ``strided`` gives q/k/v as [B, T, H, D] transposes and a prefix bank whose last
    dimension is not unit-stride. ``padded_keys[b]`` leading keys of row b are padding."""

    def heads_last(shape):
        b, h, t, d = shape
        return torch.randn(b, t, h, d, dtype=dtype).transpose(1, 2) if strided else torch.randn(shape, dtype=dtype)

    def bank():
        return torch.randn(N, Hkv, D, P, dtype=dtype).transpose(2, 3) if strided else torch.randn(N, Hkv, P, D,
                                                                                                    dtype=dtype)

    q, k, v = heads_last((B, Hq, T, D)), heads_last((B, Hkv, S, D)), heads_last((B, Hkv, S, D))
    key_padding_mask = torch.arange(S)[None, :] >= torch.tensor(padded_keys)[:, None]
    return dict(
        q=q, k=k, v=v, prefix_k=bank(), prefix_v=bank(),
        prefix_index=torch.tensor(prefix_index, dtype=torch.int32),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        key_padding_mask=key_padding_mask,
    )


CASES = {
    # GQA 4, bank row 2 used twice and a row without prefix, ragged lengths over two key blocks,
    # left padding that leaves the first queries of row 1 with no key at all, strided inputs.
    "gqa-bank-padding": dict(B=3, Hq=8, Hkv=2, T=19, S=37, N=3, P=70, D=24, prefix_index=[2, -1, 2],
                             prefix_lens=[5, 70, 41], padded_keys=[0, 20, 3], strided=True, causal=True),
    "mha-noncausal": dict(B=2, Hq=2, Hkv=2, T=70, S=70, N=2, P=9, D=64, prefix_index=[1, 0],
                          prefix_lens=[9, 4], padded_keys=[0, 0], strided=False, causal=False),
    "no-prefix": dict(B=2, Hq=4, Hkv=1, T=5, S=9, N=1, P=0, D=16, prefix_index=[0, 0],
                      prefix_lens=[0], padded_keys=[2, 0], strided=False, causal=True),
    # One token per row: rows sharing a bank row are attended together (see THREADS).
    "decode-shared-bank": dict(B=12, Hq=4, Hkv=2, T=1, S=6, N=3, P=40, D=32,
                               prefix_index=[0, 1, 0, 0, -1, 1, 0, 0, 2, 0, 1, 0], prefix_lens=[40, 17, 0],
                               padded_keys=[0, 2, 0, 0, 6, 0, 1, 0, 0, 0, 0, 3], strided=False, causal=True),
}


# The kernels pick their work split from the thread count. With one thread the forward attends batch
# rows that share a bank row together; with more threads than (batch row, kv head) pairs the backward
# cuts each pair's keys into pieces and sums their dq. Both paths run whatever this machine has.
THREADS = (1, 7)


@contextlib.contextmanager
def _threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_oracle(case: str, dtype: torch.dtype, threads: int) -> None:
    spec = dict(CASES[case])
    causal = spec.pop("causal")
    x = _inputs(dtype, **spec)
    scale = spec["D"] ** -0.5
    with _threads(threads):
        out, lse = _cpp.forward(*x.values(), causal, scale, 0.0, 0)

    leaves = {name: x[name].detach().double().requires_grad_() for name in ("q", "k", "v", "prefix_k", "prefix_v")}
    ref_out, ref_lse = reference_prefix_attention(
        *leaves.values(), prefix_index=x["prefix_index"], prefix_lens=x["prefix_lens"],
        key_padding_mask=x["key_padding_mask"], causal=causal, scale=scale,
    )
    grad_out = torch.randn_like(out)
    ref_out.backward(grad_out.double())
    with _threads(threads):
        grads = _cpp.backward(grad_out, *x.values(), out, lse, causal, scale, 0.0, 0)

    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=atol, rtol=rtol)
    # lse is float32 whatever the input dtype.
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-5, rtol=1e-6)
    for grad, (name, leaf) in zip(grads, leaves.items(), strict=True):
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        torch.testing.assert_close(grad.double(), leaf.grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert not any(t.isnan().any() for t in (out, lse, *grads))


def test_query_without_keys_gives_zero_output_and_gradients() -> None:
    spec = dict(CASES["gqa-bank-padding"])
    spec.pop("causal")
    x = _inputs(torch.float32, **spec)
    out, lse = _cpp.forward(*x.values(), True, 0.2, 0.0, 0)
    # Row 1 has no prefix and its first 20 keys are padding: queries t < 2 see nothing (S - T = 18).
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))
    assert torch.isneginf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2:]).all()
    dq = _cpp.backward(torch.randn_like(out), *x.values(), out, lse, True, 0.2, 0.0, 0)[0]
    assert torch.equal(dq[1, :, :2], torch.zeros_like(dq[1, :, :2]))


def test_prefix_gradient_is_deterministic() -> None:
    spec = dict(CASES["gqa-bank-padding"])
    spec.pop("causal")
    x = _inputs(torch.float32, **spec)
    out, lse = _cpp.forward(*x.values(), True, 0.2, 0.0, 0)
    grad_out = torch.randn_like(out)
    first = _cpp.backward(grad_out, *x.values(), out, lse, True, 0.2, 0.0, 0)
    second = _cpp.backward(grad_out, *x.values(), out, lse, True, 0.2, 0.0, 0)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


class _FixedSeedDropout(torch.autograd.Function):
    """The cpu kernels under autograd with one dropout seed, so gradcheck sees a fixed function."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, extras):
        out, lse = _cpp.forward(q, k, v, prefix_k, prefix_v, *extras)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse)
        ctx.extras = extras
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, prefix_k, prefix_v, out, lse = ctx.saved_tensors
        index, lens, mask, causal, scale, p, seed = ctx.extras
        grads = _cpp.backward(
            grad_out.contiguous(), q, k, v, prefix_k, prefix_v, index, lens, mask, out, lse, causal, scale, p, seed
        )
        return (*grads, None)


DROPOUT_SHAPES = {
    "prefill": dict(B=2, Hq=4, Hkv=2, T=3, S=5, N=2, P=4, D=8, prefix_index=[1, 1], prefix_lens=[2, 3],
                    padded_keys=[0, 1], strided=False),
    "decode": dict(B=4, Hq=2, Hkv=1, T=1, S=3, N=2, P=5, D=4, prefix_index=[1, 0, 1, 1], prefix_lens=[2, 5],
                   padded_keys=[0, 1, 0, 2], strided=False),
}


def _dropout_inputs(dtype, shape):
    x = _inputs(dtype, **DROPOUT_SHAPES[shape])
    tensors = [x[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    return tensors, x


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", list(DROPOUT_SHAPES))
def test_dropout_backward_is_the_gradient_of_dropout_forward(shape: str, threads: int) -> None:
    tensors, x = _dropout_inputs(torch.float64, shape)
    extras = (x["prefix_index"], x["prefix_lens"], x["key_padding_mask"], True, 0.35, 0.3, 1234)
    with _threads(threads):
        assert torch.autograd.gradcheck(lambda *t: _FixedSeedDropout.apply(*t, extras), tensors)


@pytest.mark.parametrize("shape", list(DROPOUT_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout_output_is_linear_in_values(dtype: torch.dtype, shape: str) -> None:
    """For a fixed seed out = A(q, k) @ [prefix_v; v], so <grad_out, out> = <dv, v> + <dprefix_v, prefix_v>."""
    tensors, x = _dropout_inputs(dtype, shape)
    args = (x["prefix_index"], x["prefix_lens"], x["key_padding_mask"], True, 0.35, 0.5, 99)
    q, k, v, prefix_k, prefix_v = (t.detach() for t in tensors)
    with _threads(1):
        out, lse = _cpp.forward(q, k, v, prefix_k, prefix_v, *args)
        again, _ = _cpp.forward(q, k, v, prefix_k, prefix_v, *args)
        other_seed, _ = _cpp.forward(q, k, v, prefix_k, prefix_v, *args[:-1], 100)
    assert torch.equal(out, again) and not torch.equal(out, other_seed)
    grad_out = torch.randn_like(out)
    _, _, dv, _, dprefix_v = _cpp.backward(grad_out, q, k, v, prefix_k, prefix_v, *args[:3], out, lse, *args[3:])
    lhs = (grad_out.double() * out.double()).sum()
    rhs = (dv.double() * v.double()).sum() + (dprefix_v.double() * prefix_v.double()).sum()
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(lhs, rhs, atol=atol * 10, rtol=rtol)


def test_kernel_rejects_mismatched_dtypes() -> None:
    x = _inputs(torch.float32, B=1, Hq=2, Hkv=1, T=2, S=2, N=1, P=1, D=4, prefix_index=[0], prefix_lens=[1],
                padded_keys=[0], strided=False)
    x["v"] = x["v"].double()
    with pytest.raises(RuntimeError, match="all five tensors must share q's dtype"):
        _cpp.forward(*x.values(), True, 0.5, 0.0, 0)


def test_kernel_rejects_out_of_range_bank_rows() -> None:
    x = _inputs(torch.float32, B=2, Hq=2, Hkv=1, T=2, S=2, N=2, P=3, D=4, prefix_index=[0, 2], prefix_lens=[1, 3],
                padded_keys=[0, 0], strided=False)
    with pytest.raises(RuntimeError, match=r"prefix_index\[1\] = 2 is outside \[-1, 2\)"):
        _cpp.forward(*x.values(), True, 0.5, 0.0, 0)
    x["prefix_index"] = torch.tensor([0, 1], dtype=torch.int32)
    x["prefix_lens"] = torch.tensor([4, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"prefix_lens\[0\] = 4 is outside \[0, 3\]"):
        _cpp.forward(*x.values(), True, 0.5, 0.0, 0)
