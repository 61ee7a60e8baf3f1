"""Backends as data, the choice between them, and the custom op with its autograd.

Each :class:`Backend` declares what it runs (device types, dtypes, head dims, features) and
:meth:`Backend.not_supported_reasons` says why it cannot take a given call. A backend module implements
two functions on the record:

- ``forward(args: AttentionArgs) -> (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``;
- ``backward(args, out, lse, grad_out, grad_lse) -> (dq, dk, dv, dprefix_k, dprefix_v)`` in the inputs'
  shapes and dtypes, the prefix gradients summed over the rows that used each bank row; ``grad_lse``
  ``[B, Hq, T]`` or ``None`` is a gradient reaching the lse.

``auto`` walks :data:`BACKENDS` in order and takes the first that lists the device among its ``auto``
devices and can run the call; when the preferred one cannot, it warns (never silently). A backend asked
for by name that cannot run the call raises :class:`~fastprompt.errors.BackendUnavailableError` listing
every backend's reasons. The backend that ran the forward is saved for the backward.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from fastprompt.attention import cpu_backend  # importing builds nothing: the kernels load on first use
from fastprompt.attention.args import FLOAT_DTYPES, AttentionArgs, Requirements, op_schema
from fastprompt.errors import BackendUnavailableError

__all__ = [
    "BACKENDS", "Backend", "attend", "available_backends", "requested_backend", "resolve_backend", "triton_unavailable"
]


@functools.cache
def _triton_missing() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


def triton_unavailable(device: torch.device) -> str | None:
    """Why triton cannot run tensors on ``device`` here, or ``None`` (shared with the prompt encoders' backends)."""
    missing = _triton_missing()
    if missing is not None:
        return missing
    # read at call time: tests and tools set TRITON_INTERPRET after import
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got cpu"
    return None


def _triton_dtype_reason(req: Requirements) -> str | None:
    if req.dtype == torch.bfloat16 and req.device.type == "cuda":
        capability = torch.cuda.get_device_capability(req.device)
        if capability < (8, 0):
            return f"bfloat16 triton kernels need a GPU of compute capability 8.0 or newer, this one has {capability}"
    return None


def _cpu_unavailable(device: torch.device) -> str | None:
    ok, reason = cpu_backend.available()
    return None if ok else reason


def _cpu_build(device: torch.device) -> str:
    return f"C++ kernels: {cpu_backend.available()[1]}"


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend of the op, declared as data.

    ``devices``: device types it runs; ``auto``: those where ``auto`` considers it; ``max_head_dim``:
    ``None`` for no limit; ``features``: optional abilities a call may need (``"dropout"``);
    ``unavailable(device)``: why it cannot run here at all (not installed, failed build), or ``None``;
    ``extra_reason(requirements)``: a limit the fields cannot state, or ``None``; ``describe(device)``:
    what runs, for ``fastprompt info``.
    """

    name: str
    module: str
    devices: tuple[str, ...]
    auto: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None
    features: frozenset[str]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    extra_reason: Callable[[Requirements], str | None] = lambda req: None
    describe: Callable[[torch.device], str] = lambda device: f"runs {device.type} tensors"

    def not_supported_reasons(self, req: Requirements) -> list[str]:
        """Every reason this backend cannot run a call with these requirements; empty if it can."""
        if self.devices != ("*",) and req.device.type not in self.devices:
            return [f"runs {' or '.join(self.devices)} tensors, got {req.device.type}"]
        reasons = []
        why = self.unavailable(req.device)
        if why is not None:
            reasons.append(why)
        if req.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"supports {names}, got {str(req.dtype).removeprefix('torch.')}")
        if self.max_head_dim is not None and req.head_dim > self.max_head_dim:
            reasons.append(f"supports head dims up to {self.max_head_dim}, got {req.head_dim}")
        if req.dropout and "dropout" not in self.features:
            reasons.append("does not support dropout")
        why = self.extra_reason(req)
        if why is not None:
            reasons.append(why)
        return reasons

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="triton",
        module="fastprompt.kernels.prefix_attention",
        devices=("cuda", "cpu"),
        auto=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        max_head_dim=256,
        features=frozenset({"dropout"}),
        unavailable=triton_unavailable,
        extra_reason=_triton_dtype_reason,
    ),
    Backend(
        name="cpu",
        module="fastprompt.attention.cpu_backend",
        devices=("cpu",),
        auto=("cpu",),
        dtypes=FLOAT_DTYPES,
        max_head_dim=None,
        features=frozenset({"dropout"}),
        unavailable=_cpu_unavailable,
        describe=_cpu_build,
    ),
    Backend(
        name="torch",
        module="fastprompt.attention.torch_backend",
        devices=("*",),
        auto=("*",),
        dtypes=FLOAT_DTYPES,
        max_head_dim=None,
        features=frozenset({"dropout"}),
    ),
)
_BY_NAME = {backend.name: backend for backend in BACKENDS}
NAMES = tuple(_BY_NAME)


def requested_backend(backend: str | None = None) -> str:
    """``backend`` checked, or ``FASTPROMPT_BACKEND`` (default ``auto``) when it is ``None``."""
    source = "FASTPROMPT_BACKEND" if backend is None else "backend"
    requested = (os.environ.get("FASTPROMPT_BACKEND", "auto").strip().lower() or "auto") if backend is None else backend
    if requested != "auto" and requested not in _BY_NAME:
        raise ValueError(f"{source} must be one of auto, {', '.join(NAMES)}; got {requested!r}")
    return requested


def _reasons_text(req: Requirements) -> str:
    lines = []
    for backend in BACKENDS:
        reasons = backend.not_supported_reasons(req)
        lines.append(f"{backend.name}: {'; '.join(reasons) if reasons else 'can run'}")
    return " | ".join(lines)


# The choice depends only on the device, dtype, head dim, dropout and the environment, so a compiled
# graph keeps the name it resolved while tracing instead of tracing through the availability checks.
# (Plain arguments: dynamo hands a constant-result function its arguments rebuilt, which a NamedTuple
# does not survive.)
@torch.compiler.assume_constant_result
def _resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, dropout: bool) -> str:
    req = Requirements(device, dtype, head_dim, dropout)
    if requested != "auto":
        if _BY_NAME[requested].not_supported_reasons(req):
            raise BackendUnavailableError(
                f"backend {requested} cannot run these tensors here ({_reasons_text(req)})"
            )
        return requested
    preferred = None
    for backend in BACKENDS:
        if req.device.type not in backend.auto and backend.auto != ("*",):
            continue
        reasons = backend.not_supported_reasons(req)
        if not reasons:
            if preferred is not None:
                warnings.warn(
                    f"fastprompt: the {preferred[0].name} backend cannot run these {req.device.type} tensors "
                    f"({'; '.join(preferred[1])}); using {backend.name}. "
                    f"Set FASTPROMPT_BACKEND={backend.name} to silence this.",
                    RuntimeWarning,
                    stacklevel=5,
                )
            return backend.name
        preferred = preferred or (backend, reasons)
    raise BackendUnavailableError(f"no backend can run these tensors ({_reasons_text(req)})")


def resolve_backend(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    head_dim: int = 128,
    *,
    dropout: bool = False,
    backend: str | None = None,
) -> str:
    """The name of the backend that runs a call on tensors of this device, dtype and head dim.

    ``backend``: ``"auto"`` or a name; ``None`` takes ``FASTPROMPT_BACKEND`` (default ``auto``). ``auto``
    warns when it has to pass over the device's preferred backend. Raises
    :class:`~fastprompt.errors.BackendUnavailableError` (with every backend's reasons) when a named
    backend cannot run such a call.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return _resolve(requested_backend(backend), torch.device(device), dtype, head_dim, dropout)


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend, ``(available, reason)`` for float32 tensors on ``device``; for one that runs, the
    reason says what runs (for ``cpu``: the prebuilt library or the ninja build).

    ``device`` defaults to ``cuda`` when a GPU is present, else ``cpu``. Asking about ``cpu`` builds or
    loads the C++ kernels if that has not happened yet.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {name: (False, "no CUDA GPU is available") for name in NAMES}
    req = Requirements(device, torch.float32, 64)
    status = {}
    for backend in BACKENDS:
        reasons = backend.not_supported_reasons(req)
        status[backend.name] = (not reasons, "; ".join(reasons) if reasons else backend.describe(device))
    return status


# ---------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, shapes from the fake implementations. Schemas come from the record.
# ---------------------------------------------------------------------------------------------------


def _run_forward(backend: str, args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _BY_NAME[backend].load().forward(args)
    return out.contiguous(), lse.contiguous()


def _forward(backend: str, return_lse: bool, *fields) -> tuple[torch.Tensor, torch.Tensor]:
    # return_lse only tells the autograd whether the lse reached the caller (and so carries a gradient)
    return _run_forward(backend, AttentionArgs(*fields))


def _backward(
    backend: str, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None, *fields
) -> tuple[torch.Tensor, ...]:
    grads = _BY_NAME[backend].load().backward(AttentionArgs(*fields), out, lse, grad_out, grad_lse)
    return tuple(g.contiguous() for g in grads)


_LIB = torch.library.Library("fastprompt", "FRAGMENT")
_LIB.define("prefix_attention_fwd" + op_schema("str backend, bool return_lse", "(Tensor, Tensor)"))
_LIB.define(
    "prefix_attention_bwd"
    + op_schema(
        "str backend, Tensor grad_out, Tensor out, Tensor lse, Tensor? grad_lse",
        "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    )
)
_LIB.impl("prefix_attention_fwd", _forward, "CompositeExplicitAutograd")
_LIB.impl("prefix_attention_bwd", _backward, "CompositeExplicitAutograd")


@torch.library.register_fake("fastprompt::prefix_attention_fwd", lib=_LIB)
def _(backend, return_lse, *fields):
    q = AttentionArgs(*fields).q
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("fastprompt::prefix_attention_bwd", lib=_LIB)
def _(backend, grad_out, out, lse, grad_lse, *fields):
    args = AttentionArgs(*fields)
    return tuple(getattr(args, name).new_empty(getattr(args, name).shape) for name in AttentionArgs.DIFFERENTIABLE)


def _setup_context(ctx, inputs, output) -> None:
    backend, return_lse, *fields = inputs
    args = AttentionArgs(*fields)
    ctx.save_for_backward(*args.tensors(), *output)
    ctx.args = args.with_tensors((None,) * len(args.tensors()))
    ctx.backend = backend  # the backend that ran the forward, never re-resolved
    ctx.return_lse = return_lse


def _autograd_backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
    *tensors, out, lse = ctx.saved_tensors  # read once: checkpointing allows a single unpack
    args = ctx.args.with_tensors(tuple(tensors))
    # the lse reached the caller only with return_lse; then its gradient is folded into delta by the backends
    grads = torch.ops.fastprompt.prefix_attention_bwd(
        ctx.backend, grad_out, out, lse, grad_lse if ctx.return_lse else None, *args.flat()
    )
    return None, None, *AttentionArgs.gradients(grads)


torch.library.register_autograd(
    "fastprompt::prefix_attention_fwd", _autograd_backward, setup_context=_setup_context, lib=_LIB
)


def attend(args: AttentionArgs, *, backend: str | None = None, return_lse: bool = False):
    """Run a validated call on the resolved backend: ``out`` or ``(out, lse)``.

    Through the custom op when autograd or tracing needs it; eager calls that need no gradient run the
    same implementation directly and skip the dispatcher (tens of microseconds a call, which adds up over
    the layers of every decoding step).
    """
    name = _resolve(requested_backend(backend), *args.requirements)
    needs_graph = torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(getattr(args, n).requires_grad for n in AttentionArgs.DIFFERENTIABLE)
    )
    if needs_graph:
        out, lse = torch.ops.fastprompt.prefix_attention_fwd(name, return_lse, *args.flat())
    else:
        out, lse = _run_forward(name, args)
    return (out, lse) if return_lse else out
