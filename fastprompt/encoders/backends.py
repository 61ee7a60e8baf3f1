"""The encoder backends as data, and the choice between them.

Each :class:`EncoderBackend` declares the module that runs it, the device types and dtypes it takes and why
it cannot run here (:meth:`EncoderBackend.not_supported_reasons`). A backend module implements four
functions; ``x`` is the input rows or, with ``idx`` [P], a table whose rows ``idx`` are the input (the
embedding lookup fused into the first layer)::

    mlp_forward(x, idx, weights, biases, act) -> (out [P, O], hiddens)
    mlp_backward(grad, x, idx, weights, hiddens, act) -> (dx_rows [P, D], dweights, dbiases)
    lstm_forward(x, idx, params) -> (y [P, 2H], c [2, P, H], gates [2, P, 4H])
    lstm_backward(dy, x, idx, params, y, c, gates) -> (dx_rows [P, D], dparams)

Outputs and saved state are in :func:`compute_dtype`; parameter gradients in the parameters' dtypes.

The names are the attention op's (``FASTPROMPT_BACKEND`` sets both), but there are no C++ encoder kernels:
``cpu`` is a declared alias (:data:`ALIASES`) of the ``torch`` backend, so that forcing the op's C++ kernels
keeps the encoders running; :func:`available_encoder_backends` lists it as such. ``auto`` walks
:data:`ENCODER_BACKENDS` in order and takes the first that lists the device among its ``auto`` devices and
can run the call, warning when it passes one over (never silently); a backend asked for by name that cannot run raises
:class:`~fastprompt.errors.BackendUnavailableError` listing every backend's reasons.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from fastprompt.attention.dispatch import triton_unavailable
from fastprompt.errors import BackendUnavailableError

__all__ = [
    "ALIASES", "ENCODER_BACKENDS", "Alias", "EncoderBackend", "available_encoder_backends", "compute_dtype",
    "load_encoder_backend", "resolve_encoder_backend",
]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half and single precision, float64 for float64 (a float64 run is an oracle: kept exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _triton_dtype_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype == torch.bfloat16 and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return f"bfloat16 triton kernels need a GPU of compute capability 8.0 or newer, this one has {capability}"
    return None


@dataclasses.dataclass(frozen=True)
class EncoderBackend:
    """An encoder backend, declared as data.

    ``module``: implements the four functions of the module docstring; ``devices``: device types it runs
    (``"*"``: any); ``auto``: those where ``auto`` considers it; ``unavailable(device)``: why it cannot run
    here at all (not installed, no interpreter), or ``None``; ``dtype_reason(device, dtype)``: a dtype limit
    of the hardware, or ``None``.
    """

    name: str
    module: str
    devices: tuple[str, ...]
    auto: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    dtype_reason: Callable[[torch.device, torch.dtype], str | None] = lambda device, dtype: None

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Every reason this backend cannot run tensors of this device and dtype; empty if it can."""
        if self.devices != ("*",) and device.type not in self.devices:
            return [f"runs {' or '.join(self.devices)} tensors, got {device.type}"]
        reasons = []
        why = self.unavailable(device)
        if why is not None:
            reasons.append(why)
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"supports {names}, got {str(dtype).removeprefix('torch.')}")
        why = self.dtype_reason(device, dtype)
        if why is not None:
            reasons.append(why)
        return reasons


@dataclasses.dataclass(frozen=True)
class Alias:
    """A backend name that runs another backend, and why."""

    name: str
    target: str
    reason: str


ENCODER_BACKENDS: tuple[EncoderBackend, ...] = (
    EncoderBackend(
        name="triton",
        module="fastprompt.kernels.prompt_encoders",
        devices=("cuda", "cpu"),
        auto=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        unavailable=triton_unavailable,
        dtype_reason=_triton_dtype_reason,
    ),
    EncoderBackend(
        name="torch",
        module="fastprompt.encoders.torch_backend",
        devices=("*",),
        auto=("*",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    ),
)

ALIASES: tuple[Alias, ...] = (
    Alias(
        name="cpu",
        target="torch",
        reason="there are no C++ encoder kernels; FASTPROMPT_BACKEND=cpu forces the attention op's C++ kernels "
        "and leaves the encoders on the PyTorch path",
    ),
)

_NAMES = tuple(b.name for b in ENCODER_BACKENDS) + tuple(a.name for a in ALIASES)


def _requested(backend: str | None) -> str:
    """``backend`` checked and with aliases followed, or ``FASTPROMPT_BACKEND`` (default ``auto``) if ``None``."""
    source = "FASTPROMPT_BACKEND" if backend is None else "backend"
    requested = (os.environ.get("FASTPROMPT_BACKEND", "auto").strip().lower() or "auto") if backend is None else backend
    if requested != "auto" and requested not in _NAMES:
        raise ValueError(f"{source} must be one of auto, {', '.join(_NAMES)}; got {requested!r}")
    return next((a.target for a in ALIASES if a.name == requested), requested)


def _by_name(name: str) -> EncoderBackend:
    for backend in ENCODER_BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"no encoder backend is named {name!r}")


def _reasons_text(device: torch.device, dtype: torch.dtype) -> str:
    lines = []
    for backend in ENCODER_BACKENDS:
        reasons = backend.not_supported_reasons(device, dtype)
        lines.append(f"{backend.name}: {'; '.join(reasons) if reasons else 'can run'}")
    return " | ".join(lines)


# The choice depends only on the device, dtype and environment, so a compiled graph keeps the name it
# resolved while tracing instead of tracing through the availability checks.
@torch.compiler.assume_constant_result
def _resolve(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    if requested != "auto":
        chosen = _by_name(requested)
        if chosen.not_supported_reasons(device, dtype):
            raise BackendUnavailableError(
                f"backend {requested} cannot run these encoder tensors here ({_reasons_text(device, dtype)})"
            )
    else:
        chosen, passed_over = None, None
        for backend in ENCODER_BACKENDS:
            if device.type not in backend.auto and backend.auto != ("*",):
                continue
            reasons = backend.not_supported_reasons(device, dtype)
            if not reasons:
                chosen = backend
                break
            passed_over = passed_over or (backend.name, reasons)
        if chosen is None:
            raise BackendUnavailableError(f"no encoder backend can run these tensors ({_reasons_text(device, dtype)})")
        if passed_over is not None:
            warnings.warn(
                f"fastprompt: the {passed_over[0]} encoder backend cannot run these {device.type} tensors "
                f"({'; '.join(passed_over[1])}); using {chosen.name}. Set FASTPROMPT_BACKEND={chosen.name} "
                "to silence this.",
                RuntimeWarning,
                stacklevel=5,
            )
    # imported here, where tracing runs eagerly: a compiled graph finds the module loaded (Dynamo cannot
    # trace an import through importlib)
    importlib.import_module(chosen.module)
    return chosen.name


def resolve_encoder_backend(backend: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """The name of the backend (``"triton"`` or ``"torch"``) that runs the encoders on such tensors.

    ``backend``: ``"auto"``, a backend name or an alias (``"cpu"`` runs ``"torch"``); ``None`` takes
    ``FASTPROMPT_BACKEND`` (default ``auto``). ``auto`` takes triton for CUDA tensors and the PyTorch path
    otherwise. Raises :class:`~fastprompt.errors.BackendUnavailableError` (with every backend's reasons)
    when a named backend cannot run such tensors, ``ValueError`` for an unknown name.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return _resolve(_requested(backend), torch.device(device), dtype)


def load_encoder_backend(name: str) -> ModuleType:
    """The module of a backend that :func:`resolve_encoder_backend` chose (and so imported)."""
    return sys.modules[_by_name(name).module]


def available_encoder_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend and alias, ``(available, reason)`` for float32 tensors on ``device`` (default ``cuda``
    when a GPU is present, else ``cpu``); an alias reports its target's availability and says what it is."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {name: (False, "no CUDA GPU is available") for name in _NAMES}
    status = {}
    for backend in ENCODER_BACKENDS:
        reasons = backend.not_supported_reasons(device, torch.float32)
        status[backend.name] = (not reasons, "; ".join(reasons) if reasons else f"runs {device.type} tensors")
    for alias in ALIASES:
        status[alias.name] = (status[alias.target][0], f"alias of {alias.target}: {alias.reason}")
    return status
