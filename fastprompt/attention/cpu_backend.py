"""The ``cpu`` backend: ATen's CPU flash attention over the sequence and the C++ kernels of ``csrc/`` over the
prefix (:mod:`~fastprompt.attention.cpu_cascade`) on long bidirectional rows, the C++ kernels over both
elsewhere and where ATen's kernel cannot serve (dropout; in backward also a gradient reaching the
lse, and float64). The kernels are prebuilt by
``setup.py`` or compiled with ninja on first use.

A library that ``setup.py`` built ahead of time (``fastprompt/csrc/_prefix_attention_cpu*.so``) is loaded
when its stamp matches this torch version, instruction set and sources; otherwise the kernels are built
through :func:`torch.utils.cpp_extension.load` into a cache directory
(``~/.cache/fastprompt/torch_extensions/<torch version>/``, or ``$FASTPROMPT_BUILD_DIR``) whose
sub-folder name holds a hash of the sources and flags, so an edited source or another instruction set
gets its own build and a shared home directory never hands an AVX-512 build to an AVX2 machine.
cpp_extension's file lock serialises concurrent builds across processes; a lock here serialises threads.
The outcome (a failed build included) is kept for the life of the process: a library cannot be unloaded.

The ops' schemas are generated here from :class:`~fastprompt.attention.args.AttentionArgs`; the C++ side
only registers implementations, whose signatures the dispatcher checks against them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fastprompt.attention import cpu_cascade
from fastprompt.attention.args import AttentionArgs, op_schema
from fastprompt.csrc import build
from fastprompt.errors import BackendUnavailableError

_ERROR_TAIL_CHARS = 3000

_lock = threading.Lock()
_status: tuple[bool, str] | None = None

_LIB = torch.library.Library("fastprompt", "FRAGMENT")
_LIB.define("prefix_attention_fwd_cpu" + op_schema("", "(Tensor, Tensor)"))
_LIB.define(
    "prefix_attention_bwd_cpu"
    + op_schema("Tensor grad_out, Tensor out, Tensor lse, Tensor? grad_lse", "(Tensor, Tensor, Tensor, Tensor, Tensor)")
)
# The prefix part alone, after ATen's flash attention ran the sequence part (fastprompt.attention.cpu_cascade);
# the forward finishes the sequence part's output in place and returns it.
_LIB.define(
    "prefix_attention_resume_fwd_cpu"
    + op_schema("Tensor(a!) sequence_out, Tensor sequence_lse", "(Tensor(a!), Tensor)")
)
_LIB.define(
    "prefix_attention_resume_bwd_cpu"
    + op_schema("Tensor grad_out, Tensor out, Tensor lse, Tensor sequence_dq", "(Tensor, Tensor, Tensor)")
)


def _csrc_dir() -> Path:
    return Path(importlib.import_module("fastprompt.csrc").__file__).parent


def prebuilt(csrc_dir: Path | None = None) -> tuple[Path | None, str]:
    """The prebuilt library to load, or ``None``, and why: absent, or built for another torch, ISA or sources."""
    csrc_dir = _csrc_dir() if csrc_dir is None else csrc_dir
    libraries = sorted(p for p in csrc_dir.glob(build.PREBUILT_NAME + "*") if p.suffix in (".so", ".pyd"))
    stamp_file = csrc_dir / build.STAMP
    if not libraries or not stamp_file.exists():
        return None, "no prebuilt library (setup.py builds one when torch is present at build time)"
    built_for = json.loads(stamp_file.read_text())
    here = build.stamp(csrc_dir)
    if built_for != here:
        differ = ", ".join(
            f"{key} {built_for.get(key)} != {value}" for key, value in here.items() if built_for.get(key) != value
        )
        return None, f"the prebuilt library {libraries[0].name} does not match ({differ})"
    return libraries[0], f"prebuilt library {libraries[0]}"


def _build_dir(name: str, cflags: list[str]) -> Path:
    base = os.environ.get("FASTPROMPT_BUILD_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "fastprompt" / "torch_extensions" / torch.__version__
    key = build.source_digest(_csrc_dir()) + " ".join(cflags) + os.environ.get("CXX", "c++")
    return root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _load() -> tuple[bool, str]:
    library, why_not = prebuilt()
    if library is not None:
        try:
            torch.ops.load_library(str(library))
        except OSError as error:
            why_not = f"loading the prebuilt library {library} failed ({error})"
        else:
            return True, why_not
    ok, reason = _build()
    return ok, f"{reason} ({why_not})"


def _build() -> tuple[bool, str]:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler found (CXX={compiler!r} is not on PATH)"
    isa, cflags, ldflags = build.build_flags()
    name = f"fastprompt_cpu_{isa}"
    build_dir = _build_dir(name, cflags)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _builder_lock(build_dir):
            fresh = not any((build_dir / f"{name}{suffix}").exists() for suffix in (".so", ".pyd"))
            if fresh:
                print(
                    f"fastprompt: compiling the C++ CPU kernels ({', '.join(build.SOURCES)} for {isa}, "
                    f"{len(build.SOURCES)} translation unit(s) on {os.cpu_count()} cores) into {build_dir}; once per "
                    f"torch version and source change, typically {build.EXPECTED_SECONDS} s...",
                    file=sys.stderr,
                    flush=True,
                )
            started = time.perf_counter()
            cpp_extension.load(
                name=name,
                sources=[str(_csrc_dir() / source) for source in build.SOURCES],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # the compiler's output arrives inside whatever cpp_extension raises
        tail = str(error)[-_ERROR_TAIL_CHARS:]
        return False, f"building the fastprompt CPU kernels in {build_dir} failed: {type(error).__name__}: {tail}"
    if fresh:
        elapsed = time.perf_counter() - started
        print(f"fastprompt: C++ CPU kernels built in {elapsed:.0f} s", file=sys.stderr, flush=True)
    return True, f"ninja build in {build_dir}"


@contextlib.contextmanager
def _builder_lock(build_dir: Path) -> Iterator[None]:
    """Hold an OS file lock on ``build_dir`` for a build, across processes.

    cpp_extension marks a build in progress with a plain ``lock`` file and waits, forever, while one exists;
    a build that was killed leaves it behind. Every fastprompt build holds this lock, which the OS releases
    when its holder dies, so a ``lock`` file found while holding it belongs to a dead build and is removed.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; cpp_extension's own lock file is all there is
        yield
        return
    with open(build_dir / "fastprompt-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            print(f"fastprompt: removing {stale}, left by a build that did not finish", file=sys.stderr, flush=True)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def available() -> tuple[bool, str]:
    """Whether the CPU kernels can run here, loading or building them on first call; ``(ok, reason)``:
    the reason names the build in use (prebuilt library or ninja build) or why there is none.

    The result is cached for the process, so a failed build costs one attempt, not one per call.
    """
    global _status
    with _lock:
        if _status is None:
            _status = _load()
        return _status


def prepare() -> None:
    """Start loading (or building, on first use) the kernels in a background thread and return at once, so
    that a caller overlaps the build with work that does not need it; :func:`available` waits for it."""
    threading.Thread(target=available, name="fastprompt-cpu-kernels", daemon=True).start()


def load() -> None:
    """Build (first use) and load the kernels; raises :class:`BackendUnavailableError` with the reason."""
    ok, reason = available()
    if not ok:
        raise BackendUnavailableError(f"fastprompt cpu backend unavailable: {reason}")


def forward(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``: the cascade of
    :mod:`~fastprompt.attention.cpu_cascade` (ATen's flash attention over the sequence, the C++ kernel over the
    prefix) where its shapes make it faster (:func:`~fastprompt.attention.cpu_cascade.runs_forward`), else, and
    always with dropout, the C++ kernel alone."""
    load()
    if args.dropout_p == 0 and cpu_cascade.runs_forward(args):
        return cpu_cascade.forward(args)
    return torch.ops.fastprompt.prefix_attention_fwd_cpu(*args.flat())


def backward(
    args: AttentionArgs, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix gradients [N, Hkv, P, D] are summed over the batch
    rows that used each bank row. ``grad_lse`` [B, Hq, T] or ``None``: a gradient reaching the lse.

    The cascade's backward where its shapes make it faster
    (:func:`~fastprompt.attention.cpu_cascade.runs_backward`), else, and always with dropout, a gradient
    reaching the lse, or float64, the C++ kernel's alone. Either backward takes either forward's ``out`` and
    ``lse``: both are the whole attention's."""
    load()
    cascade = args.dropout_p == 0 and grad_lse is None and args.q.dtype != torch.float64
    if cascade and cpu_cascade.runs_backward(args):
        return cpu_cascade.backward(args, out, lse, grad_out)
    return torch.ops.fastprompt.prefix_attention_bwd_cpu(grad_out, out, lse, grad_lse, *args.flat())
