"""The ``cpu`` backend's build and kernels (``fastprompt.attention.cpu_backend``, ``csrc/``).

Only what is specific to the C++ build lives here: it compiles and registers its ops, reports why when
it cannot build, covers every dtype (fp64 included) against the float64 oracle, and its dropout
backward matches its dropout forward. The op-level matrix over all backends is
``tests/test_prefix_attention.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fastprompt.csrc import build

from fastprompt.attention import cpu_backend as _cpp
from fastprompt.attention.args import AttentionArgs
from fastprompt.attention.cases import TOLERANCE, make_case, max_error, scale_of
from fastprompt.attention.reference import reference_prefix_attention


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    ok, reason = _cpp.available()
    assert ok, reason


def _run_python(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ops_are_registered_with_the_record_schema() -> None:
    """The schemas come from the record's fields; the C++ implementations were accepted against them."""
    fwd = str(torch.ops.fastprompt.prefix_attention_fwd_cpu.default._schema)
    bwd = str(torch.ops.fastprompt.prefix_attention_bwd_cpu.default._schema)
    record = "Tensor? prefix_index, Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float scale, "
    assert record + "float dropout_p, Tensor? seed) -> (Tensor, Tensor)" in fwd
    assert "(Tensor grad_out, Tensor out, Tensor lse, Tensor? grad_lse, Tensor q," in bwd
    assert bwd.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastprompt::prefix_attention_fwd_cpu", "CPU")


def _prebuilt_dir(tmp_path: Path) -> Path:
    """A stand-in for an installed ``fastprompt/csrc`` that setup.py built: the sources, the library (the
    ninja build of this session, the same code) and the stamp for this machine."""
    ninja_dir = Path(_cpp.available()[1].removeprefix("ninja build in ").split(" (")[0])
    isa = build.isa_flags()[0]
    for source in (*build.SOURCES, *build.HEADERS):
        shutil.copy(_cpp._csrc_dir() / source, tmp_path / source)
    shutil.copy(ninja_dir / f"fastprompt_cpu_{isa}.so", tmp_path / f"{build.PREBUILT_NAME}.cpython-x.so")
    build.write_stamp(tmp_path, tmp_path)
    return tmp_path


def test_loader_takes_a_prebuilt_library_only_when_it_matches(tmp_path) -> None:
    assert _cpp.prebuilt(tmp_path) == (None, "no prebuilt library (setup.py builds one when torch is present at "
                                             "build time)")
    csrc = _prebuilt_dir(tmp_path)
    library, reason = _cpp.prebuilt(csrc)
    assert library == csrc / f"{build.PREBUILT_NAME}.cpython-x.so" and reason == f"prebuilt library {library}"

    stamp = json.loads((csrc / build.STAMP).read_text())
    (csrc / build.STAMP).write_text(json.dumps({**stamp, "torch": "1.0.0"}))
    library, reason = _cpp.prebuilt(csrc)
    assert library is None and f"torch 1.0.0 != {torch.__version__}" in reason
    build.write_stamp(csrc, csrc)
    (csrc / build.SOURCES[0]).write_text("// edited\n")  # a library built from other sources is stale
    library, reason = _cpp.prebuilt(csrc)
    assert library is None and "sources " in reason and "does not match" in reason


def test_prebuilt_library_is_loaded_and_named_by_info(tmp_path) -> None:
    csrc = _prebuilt_dir(tmp_path)
    result = _run_python(
        f"""
        from pathlib import Path
        import torch
        import fastprompt
        from fastprompt.attention import cpu_backend
        cpu_backend._csrc_dir = lambda: Path({str(csrc)!r})
        print(fastprompt.available_backends("cpu")["cpu"])
        q = torch.randn(1, 2, 3, 8)
        out = fastprompt.prefix_attention(q, q, q, q[:, :, :2], q[:, :, :2], backend="cpu")
        expected = fastprompt.prefix_attention(q, q, q, q[:, :, :2], q[:, :, :2], backend="torch")
        print("same:", torch.allclose(out, expected, atol=1e-5))
        """,
        FASTPROMPT_BUILD_DIR=str(tmp_path / "no-ninja-build-here"),
    )
    assert result.returncode == 0, result.stderr
    assert f"(True, 'C++ kernels: prebuilt library {csrc}/{build.PREBUILT_NAME}.cpython-x.so')" in result.stdout
    assert "same: True" in result.stdout
    assert not (tmp_path / "no-ninja-build-here").exists()


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


def _broken_compiler(folder: Path) -> Path:
    """A compiler that answers version queries like the real one and fails on every source file."""
    compiler = folder / "broken-c++"
    compiler.write_text(
        "#!/bin/sh\n"
        'case "$*" in *.cpp*) echo "broken compiler says no" >&2; exit 1;; esac\n'
        f'exec {shutil.which("c++")} "$@"\n'
    )
    compiler.chmod(0o755)
    return compiler


def test_failed_build_reports_compiler_output_once(tmp_path) -> None:
    compiler = _broken_compiler(tmp_path)
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
    # the first-use message names what is built, where, and how long it usually takes
    assert "fastprompt: compiling the C++ CPU kernels (prefix_attention_forward.cpp, prefix_attention_backward.cpp" in (
        result.stderr
    )
    assert f"typically {build.EXPECTED_SECONDS} s..." in result.stderr
    assert "kernels built in" not in result.stderr


def test_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path) -> None:
    # A build killed midway leaves cpp_extension's lock file, on which every later build would wait forever.
    compiler = _broken_compiler(tmp_path)
    script = """
        from fastprompt.attention import cpu_backend as _cpp
        from fastprompt.csrc import build
        isa, cflags, _ = build.build_flags()
        build_dir = _cpp._build_dir(f"fastprompt_cpu_{isa}", cflags)
        build_dir.mkdir(parents=True)
        (build_dir / "lock").touch()
        print(_cpp._build())
        """
    result = _run_python(script, CXX=str(compiler), FASTPROMPT_BUILD_DIR=str(tmp_path / "build"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "left by a build that did not finish" in result.stderr
    assert result.stdout.startswith("(False, \"building the fastprompt CPU kernels")
    assert "broken compiler says no" in result.stdout


def _args(dtype: torch.dtype, padded_keys: list[int], causal: bool = True, scale: float | None = None,
          dropout_p: float = 0.0, seed: int | None = None, requires_grad: bool = False, **shape) -> AttentionArgs:
    """The record the kernels take; ``padded_keys[b]`` leading keys of row b are padding."""
    case = make_case(dtype=dtype, padding=[(n, 0) for n in padded_keys], causal=causal,
                     requires_grad=requires_grad, **shape)
    args = case.args(scale=scale)
    return dataclasses.replace(args, dropout_p=dropout_p, seed=None if seed is None else torch.tensor(seed))


CASES = {
    # GQA 4, bank row 2 used twice and a row without prefix, ragged lengths over two key blocks,
    # left padding that leaves the first queries of row 1 with no key at all, strided inputs.
    "gqa-bank-padding": dict(B=3, Hq=8, Hkv=2, T=19, S=37, N=3, P=70, D=24, prefix_index=[2, -1, 2],
                             prefix_lens=[5, 70, 41], padded_keys=[0, 20, 3], strided=True, causal=True),
    "mha-noncausal": dict(B=2, Hq=2, Hkv=2, T=70, S=70, N=2, P=9, D=64, prefix_index=[1, 0],
                          prefix_lens=[9, 4], padded_keys=[0, 0], strided=False, causal=False),
    # no index and no lengths: every row uses bank row 0 at its full length P
    "no-index": dict(B=2, Hq=4, Hkv=1, T=5, S=9, N=1, P=7, D=16, prefix_index=None,
                     prefix_lens=None, padded_keys=[2, 0], strided=False, causal=True),
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
    args = _args(dtype, **CASES[case])
    with _threads(threads):
        out, lse = _cpp.forward(args)

    leaves = [x.detach().double().requires_grad_() for x in args.tensors()[:5]]
    ref_out, ref_lse = reference_prefix_attention(args.with_inputs(leaves))
    grad_out = torch.randn_like(out)
    ref_out.backward(grad_out.double())
    with _threads(threads):
        grads = _cpp.backward(args, out, lse, grad_out, None)

    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert max_error(out, ref_out) <= tol.out * scale_of(ref_out)
    # lse is float32 whatever the input dtype.
    assert max_error(lse, ref_lse) <= max(tol.out, TOLERANCE[torch.float32].out) * scale_of(ref_lse)
    for grad, name, leaf in zip(grads, AttentionArgs.DIFFERENTIABLE, leaves, strict=True):
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        err, bound = max_error(grad, leaf.grad), tol.grad * scale_of(leaf.grad)
        assert err <= bound, f"gradient of {name}: max error {err:.3g} > {bound:.3g}"
    assert not any(t.isnan().any() for t in (out, lse, *grads))


def test_query_without_keys_gives_zero_output_and_gradients() -> None:
    args = _args(torch.float32, **{**CASES["gqa-bank-padding"], "scale": 0.2})
    out, lse = _cpp.forward(args)
    # Row 1 has no prefix and its first 20 keys are padding: queries t < 2 see nothing (S - T = 18).
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))
    assert torch.isneginf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2:]).all()
    dq = _cpp.backward(args, out, lse, torch.randn_like(out), None)[0]
    assert torch.equal(dq[1, :, :2], torch.zeros_like(dq[1, :, :2]))


def test_prefix_gradient_is_deterministic() -> None:
    args = _args(torch.float32, **CASES["gqa-bank-padding"])
    out, lse = _cpp.forward(args)
    grad_out = torch.randn_like(out)
    first = _cpp.backward(args, out, lse, grad_out, None)
    second = _cpp.backward(args, out, lse, grad_out, None)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


class _FixedSeedDropout(torch.autograd.Function):
    """The cpu kernels under autograd with one dropout seed, so gradcheck sees a fixed function."""

    @staticmethod
    def forward(ctx, args, *tensors):
        args = args.with_tensors((*tensors, *args.tensors()[5:]))
        out, lse = _cpp.forward(args)
        ctx.save_for_backward(out, lse)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, lse = ctx.saved_tensors
        return None, *_cpp.backward(ctx.args, out, lse, grad_out.contiguous(), None)


DROPOUT_SHAPES = {
    "prefill": dict(B=2, Hq=4, Hkv=2, T=3, S=5, N=2, P=4, D=8, prefix_index=[1, 1], prefix_lens=[2, 3],
                    padded_keys=[0, 1]),
    "decode": dict(B=4, Hq=2, Hkv=1, T=1, S=3, N=2, P=5, D=4, prefix_index=[1, 0, 1, 1], prefix_lens=[2, 5],
                   padded_keys=[0, 1, 0, 2]),
}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", list(DROPOUT_SHAPES))
def test_dropout_backward_is_the_gradient_of_dropout_forward(shape: str, threads: int) -> None:
    args = _args(torch.float64, scale=0.35, dropout_p=0.3, seed=1234, requires_grad=True, **DROPOUT_SHAPES[shape])
    with _threads(threads):
        assert torch.autograd.gradcheck(lambda *t: _FixedSeedDropout.apply(args, *t), args.tensors()[:5])


@pytest.mark.parametrize("shape", list(DROPOUT_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout_output_is_linear_in_values(dtype: torch.dtype, shape: str) -> None:
    """For a fixed seed out = A(q, k) @ [prefix_v; v], so <grad_out, out> = <dv, v> + <dprefix_v, prefix_v>."""
    args = _args(dtype, scale=0.35, dropout_p=0.5, seed=99, **DROPOUT_SHAPES[shape])
    with _threads(1):
        out, lse = _cpp.forward(args)
        again, _ = _cpp.forward(args)
        other_seed, _ = _cpp.forward(dataclasses.replace(args, seed=torch.tensor(100)))
    assert torch.equal(out, again) and not torch.equal(out, other_seed)
    grad_out = torch.randn_like(out)
    _, _, dv, _, dprefix_v = _cpp.backward(args, out, lse, grad_out, None)
    lhs = (grad_out.double() * out.double()).sum()
    rhs = (dv.double() * args.v.double()).sum() + (dprefix_v.double() * args.prefix_v.double()).sum()
    assert abs(lhs - rhs).item() <= TOLERANCE[dtype].out * max(1.0, abs(lhs.item()))


SMALL = dict(B=2, Hq=2, Hkv=1, T=2, S=2, N=2, P=3, D=4, prefix_index=[0, 1], prefix_lens=[1, 3], padded_keys=[0, 0])


def _kernel_forward(args):
    """The C++ forward op itself (the backend's forward runs ATen's flash kernel first)."""
    _cpp.load()
    return torch.ops.fastprompt.prefix_attention_fwd_cpu(*args.flat())


def test_kernel_rejects_mismatched_dtypes() -> None:
    args = _args(torch.float32, **SMALL)
    with pytest.raises(RuntimeError, match="all five tensors must share q's dtype"):
        _kernel_forward(dataclasses.replace(args, v=args.v.double()))


def test_kernel_rejects_out_of_range_bank_rows() -> None:
    args = _args(torch.float32, **SMALL)
    with pytest.raises(RuntimeError, match=r"prefix_index\[1\] = 2 is outside \[-1, 2\)"):
        _kernel_forward(dataclasses.replace(args, prefix_index=torch.tensor([0, 2], dtype=torch.int32)))
    with pytest.raises(RuntimeError, match=r"prefix_lens\[0\] = 4 is outside \[0, 3\]"):
        _kernel_forward(dataclasses.replace(args, prefix_lens=torch.tensor([4, 3], dtype=torch.int32)))
