"""The ``cpu`` backend: C++ kernels of ``csrc/``, compiled with ninja on first use.

The build goes through :func:`torch.utils.cpp_extension.load` into a cache directory
(``~/.cache/fastprompt/torch_extensions/<torch version>/``, or ``$FASTPROMPT_BUILD_DIR``) whose
sub-folder name holds a hash of the sources and flags, so an edited source or another instruction set
gets its own build and a shared home directory never hands an AVX-512 build to an AVX2 machine.
cpp_extension's file lock serialises concurrent builds across processes; a lock here serialises threads.
A failed build is remembered for the life of the process and never retried on every call.

:func:`forward` and :func:`backward` follow the backend contract (shapes in
:func:`fastprompt.prefix_attention`): q [B, Hq, T, D]; k, v [B, Hkv, S, D]; prefix_k, prefix_v
[N, Hkv, P, D]; prefix_index int32 [B]; prefix_lens int32 [N]; key_padding_mask bool [B, S] or None.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from fastprompt.errors import BackendUnavailableError

_SOURCES = ("prefix_attention.cpp", "shared_prefix.cpp")
_ERROR_TAIL_CHARS = 3000

_lock = threading.Lock()
_status: tuple[bool, str] | None = None


def _csrc_dir() -> Path:
    return Path(importlib.import_module("fastprompt.csrc").__file__).parent


def _isa_flags() -> tuple[str, list[str]]:
    """(name, compiler flags) for the widest vector ISA torch reports for this machine.

    The kernels use ``at::vec::Vectorized``, whose width follows the ``CPU_CAPABILITY_*`` macro.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512", [
            "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
        ]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def _build_flags() -> tuple[str, list[str], list[str]]:
    """(isa name, cflags, ldflags)."""
    isa, isa_flags = _isa_flags()
    cflags = ["-O3", *isa_flags]
    ldflags: list[str] = []
    # at::parallel_for is OpenMP inside torch's headers: without -fopenmp the kernels run on one thread.
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return isa, cflags, ldflags


def _build_dir(name: str, cflags: list[str]) -> Path:
    base = os.environ.get("FASTPROMPT_BUILD_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "fastprompt" / "torch_extensions" / torch.__version__
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update((_csrc_dir() / source).read_bytes())
    digest.update(" ".join(cflags).encode())
    digest.update(os.environ.get("CXX", "c++").encode())
    return root / f"{name}-{digest.hexdigest()[:12]}"


def _build() -> tuple[bool, str]:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler found (CXX={compiler!r} is not on PATH)"
    isa, cflags, ldflags = _build_flags()
    name = f"fastprompt_cpu_{isa}"
    build_dir = _build_dir(name, cflags)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any((build_dir / f"{name}{suffix}").exists() for suffix in (".so", ".pyd")):
            print("fastprompt: compiling CPU kernels (first use, about a minute)...", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name,
            sources=[str(_csrc_dir() / source) for source in _SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # the compiler's output arrives inside whatever cpp_extension raises
        tail = str(error)[-_ERROR_TAIL_CHARS:]
        return False, f"building the fastprompt CPU kernels in {build_dir} failed: {type(error).__name__}: {tail}"
    return True, f"built in {build_dir}"


def available() -> tuple[bool, str]:
    """Whether the CPU kernels can run here, building them on first call; ``(ok, reason)``.

    The result is cached for the process, so a failed build costs one attempt, not one per call.
    """
    global _status
    with _lock:
        if _status is None:
            _status = _build()
        return _status


def load() -> None:
    """Build (first use) and load the kernels; raises :class:`BackendUnavailableError` with the reason."""
    ok, reason = available()
    if not ok:
        raise BackendUnavailableError(f"fastprompt cpu backend unavailable: {reason}")


def _int64_seed(seed: int) -> int:
    """The schema's int is signed 64-bit; keep the seed's low 64 bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_index: torch.Tensor,
    prefix_lens: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``."""
    load()
    return torch.ops.fastprompt.prefix_attention_fwd_cpu(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask,
        bool(causal), float(scale), float(dropout_p), _int64_seed(seed),
    )


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_index: torch.Tensor,
    prefix_lens: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix gradients [N, Hkv, P, D] are summed
    over the batch rows that used each bank row. ``grad_lse`` [B, Hq, T]: a gradient reaching the lse."""
    load()
    return torch.ops.fastprompt.prefix_attention_bwd_cpu(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, out, lse, grad_lse,
        bool(causal), float(scale), float(dropout_p), _int64_seed(seed),
    )
