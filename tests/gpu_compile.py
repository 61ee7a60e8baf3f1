"""Compile every Triton kernel of fastprompt for an NVIDIA GPU on a machine that has none.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not whether they compile:
block shapes, ``tl.dot`` operand sizes, layouts and shared memory are only seen by the GPU compiler.
This script runs the real launchers on ``meta`` tensors with a stand-in Triton driver that reports a
chosen compute capability, so every launch compiles (Triton to PTX, then ``ptxas`` to a cubin, both
bundled with triton) and nothing runs. For each compiled kernel it reports shared memory, registers
and stack bytes per thread (spills), and it fails when a kernel does not compile or needs more
shared memory than the GPU gives one block.

    python tests/gpu_compile.py [--arch 90] [--quick]

Must run without ``TRITON_INTERPRET`` (``tests/test_gpu_compile.py`` starts it in a clean subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# Most dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
HEAD_DIMS = (32, 64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Compiled:
    case: str
    kernel: str
    shared: int
    num_warps: int
    registers: int
    stack_bytes: int


class _FakeDriver:
    """The part of Triton's driver interface that ``JITFunction.run`` uses, for a GPU that is not there."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a cubin's kernel, read with the cuobjdump triton bundles; a
    kernel that runs out of registers spills to its stack."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    assert regs and stack, f"unexpected cuobjdump output: {text!r}"
    return int(regs.group(1)), int(stack.group(1))


@contextlib.contextmanager
def compile_only(arch: int, record: Callable) -> Iterator[None]:
    """Within the block every Triton launch compiles for ``sm_<arch>`` and hands its CompiledKernel to
    ``record`` instead of running. Each kernel's per-device caches (which pin the target and hold the
    compiled kernels) are swapped for empty ones on first use and restored after, so neither a real
    launch before nor another architecture after sees this block's kernels."""
    from triton.runtime import jit
    from triton.runtime.driver import driver

    run = jit.JITFunction.run
    saved: dict[jit.JITFunction, object] = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        if self not in saved:
            saved[self] = self.device_caches
            self.device_caches = type(self.device_caches)(self.create_binder)
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        record(kernel, grid)
        return kernel

    previous = driver._active  # None until a real driver was needed; reset_active() would create one
    driver.set_active(_FakeDriver(arch))
    jit.JITFunction.run = compile_instead
    try:
        yield
    finally:
        jit.JITFunction.run = run
        driver._active = previous
        for fn, caches in saved.items():
            fn.device_caches = caches


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _attention(dtype: torch.dtype, D: int, full: bool, T: int) -> None:
    """Launch the prefix-attention forward (and, for T > 16, the backward) on meta tensors; ``full`` turns
    on causal masking, key padding, dropout and an lse gradient."""
    from fastprompt.attention import AttentionArgs
    from fastprompt.kernels import prefix_attention as pa

    B, Hq, Hkv, S, N, P = 2, 8, 2, 64, 3, 40
    q = _meta(B, Hq, T, D, dtype=dtype)
    k, v = _meta(B, Hkv, S, D, dtype=dtype), _meta(B, Hkv, S, D, dtype=dtype)
    pk, pv = _meta(N, Hkv, P, D, dtype=dtype), _meta(N, Hkv, P, D, dtype=dtype)
    index, lens = _meta(B, dtype=torch.int32), _meta(N, dtype=torch.int32)
    kpm = _meta(B, S, dtype=torch.bool) if full else None
    dropout_p = 0.1 if full else 0.0
    args = AttentionArgs(q, k, v, pk, pv, index, lens, kpm, full, D**-0.5, dropout_p, torch.tensor(7))
    out, lse = pa.forward(args)
    if T > pa._DECODE_MAX_T:
        pa.backward(args, out, lse, torch.empty_like(out), torch.empty_like(lse) if full else None)


def _grouped_decode(dtype: torch.dtype, D: int) -> None:
    """Launch the grouped decode path (the prefix part per group of rows sharing a bank row, the sequence
    part per row, one merge) on meta tensors."""
    from fastprompt.attention import AttentionArgs
    from fastprompt.kernels import prefix_attention as pa

    B, Hq, Hkv, T, S, N, P = 8, 8, 2, 4, 64, 3, 300
    q = _meta(B, Hq, T, D, dtype=dtype)
    k, v = _meta(B, Hkv, S, D, dtype=dtype), _meta(B, Hkv, S, D, dtype=dtype)
    pk, pv = _meta(N, Hkv, P, D, dtype=dtype), _meta(N, Hkv, P, D, dtype=dtype)
    index, lens = _meta(B, dtype=torch.int32), _meta(N, dtype=torch.int32)
    args = AttentionArgs(q, k, v, pk, pv, index, lens, _meta(B, S, dtype=torch.bool), True, D**-0.5, 0.0, None)
    assert pa.groups_rows(args)
    pa.forward(args)


def _mlp(dtype: torch.dtype) -> None:
    from fastprompt.kernels import prompt_encoders as pe

    x, idx = _meta(30, 48, dtype=dtype), _meta(20, dtype=torch.int64)
    weights = [_meta(96, 48, dtype=dtype), _meta(64, 96, dtype=dtype)]
    biases = [_meta(96, dtype=dtype), _meta(64, dtype=dtype)]
    for act in ("tanh", "relu"):
        out, hiddens = pe.mlp_forward(x, idx, weights, biases, act)
        pe.mlp_backward(torch.empty_like(out), x, idx, weights, hiddens, act)


def _lstm(dtype: torch.dtype, H: int) -> None:
    from fastprompt.kernels import prompt_encoders as pe

    x, idx = _meta(30, 48, dtype=dtype), _meta(20, dtype=torch.int64)
    params = [_meta(4 * H, 48, dtype=dtype), _meta(4 * H, H, dtype=dtype),
              _meta(4 * H, dtype=dtype), _meta(4 * H, dtype=dtype)] * 2
    y, c, gates = pe.lstm_forward(x, idx, params)
    pe.lstm_backward(torch.empty_like(y), x, idx, params, y, c, gates)


def cases(quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, launch) pairs: the prefix-attention kernels over dtypes, head dims and their constexpr
    branches (tiled forward + backward at T = 64, decode at T = 4, per row and grouped); the fused MLP
    forward and backward with both activations; the LSTM in its one-launch (H = 64) and per-step (H = 2048) modes."""
    dtypes, dims = ((torch.bfloat16, torch.float32), (80, 256)) if quick else (DTYPES, HEAD_DIMS)
    for dtype, D, full in itertools.product(dtypes, dims, (True, False)):
        name = f"attention {_name(dtype)} D={D} {'causal+kpm+dropout' if full else 'plain'}"
        yield f"{name} T=64", functools.partial(_attention, dtype, D, full, 64)
        yield f"{name} T=4 (decode)", functools.partial(_attention, dtype, D, full, 4)
    for dtype, D in itertools.product(dtypes, dims):
        yield f"attention {_name(dtype)} D={D} T=4 (decode, rows grouped by bank row)", functools.partial(
            _grouped_decode, dtype, D)
    for dtype in (torch.float32,) if quick else DTYPES:
        yield f"encoder MLP {_name(dtype)}", functools.partial(_mlp, dtype)
        for H in (64, 2048):
            yield f"encoder LSTM H={H} {_name(dtype)}", functools.partial(_lstm, dtype, H)


def compile_all(arch: int, quick: bool = False) -> list[Compiled]:
    """Compile every case for ``sm_<arch>``; raises on a compile error (naming the case)."""
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET: the interpreter compiles nothing"
    results: list[Compiled] = []
    case = ""

    def record(kernel, grid) -> None:
        entry = Compiled(case, kernel.name, kernel.metadata.shared, kernel.metadata.num_warps,
                         *_resource_usage(kernel.asm["cubin"]))
        if entry not in results:  # a launcher may run one kernel several times with the same specialisation
            results.append(entry)

    with compile_only(arch, record):
        for case, launch in cases(quick):
            try:
                launch()
            except Exception as e:
                raise RuntimeError(f"{case}: does not compile for sm_{arch}: {type(e).__name__}: {e}") from e
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument("--quick", action="store_true", help="the widest tiles only")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.quick)
    limit = SHARED_LIMIT[args.arch]
    print("| case | kernel | warps | shared (bytes) | registers | stack (bytes) |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.case} | {r.kernel} | {r.num_warps} | {r.shared} | {r.registers} | {r.stack_bytes} |")
    over = [r for r in results if r.shared > limit]
    for r in over:
        print(f"{r.case}: {r.kernel} needs {r.shared} bytes of shared memory; sm_{args.arch} gives {limit}",
              file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
