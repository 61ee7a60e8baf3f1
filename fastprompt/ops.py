"""The prefix-attention op: public function → custom op with autograd → backend kernels.

Backends (``FASTPROMPT_BACKEND=auto|triton|cpu|torch``, default ``auto``):

- ``triton`` (``fastprompt.kernels.prefix_attention``): CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``;
- ``cpu`` (``fastprompt._cpp``, the C++ kernels of ``csrc/``, compiled with ninja on first use);
- ``torch`` (``fastprompt._torch_backend``): pure PyTorch.

``auto`` takes triton for CUDA tensors and cpu for CPU tensors; it falls back to ``torch`` only when that
backend cannot run here, and then says so once with a warning (never silently). A backend asked for by
name that cannot run the given tensors raises :class:`~fastprompt.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastprompt.errors import BackendUnavailableError
from fastprompt.merge import merge_attention_states

__all__ = ["available_backends", "merge_attention_states", "prefix_attention", "resolve_backend"]

BACKENDS = ("triton", "cpu", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    return True, "triton is installed"


def _backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run tensors on ``device`` here, and why (not)."""
    if name == "torch":
        return True, "pure PyTorch, always available"
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs CPU tensors only, got {device.type} tensors"
        from fastprompt import _cpp

        return _cpp.available()
    if name == "triton":
        ok, why = _triton_status()
        if not ok:
            return ok, why
        if device.type == "cuda":
            return True, "triton kernels on CUDA"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return True, "triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, f"triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend, ``(available, reason)`` for tensors on ``device``.

    ``device`` defaults to ``cuda`` when a GPU is present, else ``cpu``. Asking about ``cpu`` compiles the
    C++ kernels if they are not built yet (once; cached).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {name: (False, "no CUDA GPU is available") for name in BACKENDS}
    return {name: _backend_status(name, device) for name in BACKENDS}


@functools.cache
def _warn_fallback(device_type: str, preferred: str, reason: str) -> None:
    warnings.warn(
        f"fastprompt: the {preferred} backend is unavailable for {device_type} tensors ({reason}); "
        "using the slower pure-PyTorch backend. Set FASTPROMPT_BACKEND=torch to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


def _inputs_unsupported(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why backend ``name`` cannot take these inputs although it runs on their device, or ``None``."""
    if name == "triton" and dtype == torch.bfloat16 and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return f"bfloat16 triton kernels need a GPU of compute capability 8.0 or newer, this one has {capability}"
    if name == "triton" and dtype == torch.float64:
        return "the triton kernels do not support float64"
    if name == "triton" and head_dim > _TRITON_MAX_HEAD_DIM:
        return f"the triton kernels support head dims up to {_TRITON_MAX_HEAD_DIM}, got {head_dim}"
    return None


def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    name = ("triton" if device.type == "cuda" else "cpu") if requested == "auto" else requested
    ok, reason = _backend_status(name, device)
    if ok:
        reason = _inputs_unsupported(name, device, dtype, head_dim)
        ok = reason is None
    if ok:
        return name
    if requested != "auto":
        raise BackendUnavailableError(f"backend {requested} cannot run these tensors here: {reason}")
    _warn_fallback(device.type, name, reason)
    return "torch"


def resolve_backend(device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int = 128) -> str:
    """The backend the op runs for tensors of this device, dtype and head dim: ``FASTPROMPT_BACKEND``'s
    choice, or what ``auto`` picks (warning once if it has to fall back to ``torch``).

    Raises :class:`~fastprompt.errors.BackendUnavailableError` if a forced backend cannot run them.
    """
    return _resolve_backend(_requested_backend(), torch.device(device), dtype, head_dim)


def _backend_module(name: str) -> ModuleType:
    if name == "triton":
        return importlib.import_module("fastprompt.kernels.prefix_attention")
    if name == "cpu":
        return importlib.import_module("fastprompt._cpp")
    return importlib.import_module("fastprompt._torch_backend")


def _requested_backend() -> str:
    requested = os.environ.get("FASTPROMPT_BACKEND", "auto").strip().lower() or "auto"
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"FASTPROMPT_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {requested!r}")
    return requested


# ---------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; the fake implementations give it shapes)
# ---------------------------------------------------------------------------------------------------


def _seed_value(seed: torch.Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def _forward_impl(
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
    seed: torch.Tensor | None,
    backend: str,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # return_lse only tells the backward whether the lse reached the caller (and so carries a gradient)
    name = _resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    inputs = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask)
    out, lse = _backend_module(name).forward(*inputs, causal, scale, dropout_p, _seed_value(seed))
    return out.contiguous(), lse.contiguous()


# Eager calls that need no gradient skip the custom op's dispatch (tens of microseconds a call, which
# adds up over the layers of every decoding step) and run this function directly: the same code.
_prefix_attention_fwd = torch.library.custom_op("fastprompt::prefix_attention_fwd", mutates_args=())(_forward_impl)


@_prefix_attention_fwd.register_fake
def _(q, *rest):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastprompt::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
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
    grad_lse: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    name = _resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    inputs = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask)
    grads = _backend_module(name).backward(
        grad_out, *inputs, out, lse, causal, scale, dropout_p, _seed_value(seed), grad_lse=grad_lse
    )
    return tuple(g.contiguous() for g in grads)


@_prefix_attention_bwd.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, *index_mask_state_and_options):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, prefix_k, prefix_v))


_N_ATTENTION_INPUTS = 8  # q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask


def _setup_context(ctx, inputs, output) -> None:
    causal, scale, dropout_p, seed, backend, return_lse = inputs[_N_ATTENTION_INPUTS:]
    ctx.save_for_backward(*inputs[:_N_ATTENTION_INPUTS], *output, seed)
    ctx.options = (causal, scale, dropout_p, backend, return_lse)


def _backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
    saved = ctx.saved_tensors  # read once: checkpointing allows a single unpack
    attention_inputs, (out, lse, seed) = saved[:_N_ATTENTION_INPUTS], saved[_N_ATTENTION_INPUTS:]
    causal, scale, dropout_p, backend, return_lse = ctx.options
    # return_lse: the lse reached the caller, so its gradient flows back too (folded into delta by the backends)
    dq, dk, dv, dprefix_k, dprefix_v = _prefix_attention_bwd(
        grad_out,
        *attention_inputs,
        out,
        lse,
        grad_lse if return_lse else None,
        causal,
        scale,
        dropout_p,
        seed,
        backend,
    )
    return dq, dk, dv, dprefix_k, dprefix_v, *[None] * 9


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------


def _check_tensor(name: str, x: object, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_index_tensor(name: str, x: object, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    x = _check_tensor(name, x, 1)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length_name}] = [{length}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x


def check_index_values(
    prefix_index: torch.Tensor | None, prefix_lens: torch.Tensor | None, num_prefixes: int, prefix_len: int
) -> None:
    """Range checks of ``prefix_index`` (in [-1, N)) and ``prefix_lens`` (in [0, P]).

    These read tensor values (a device sync on CUDA); callers that run the op many times with the same
    index tensors (every layer of a model) check once and then call :func:`prefix_attention_checked`.
    """
    if prefix_index is not None and prefix_index.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(prefix_index)).tolist()  # one read of the device
        if lo < -1 or hi >= num_prefixes:
            raise ValueError(
                f"prefix_index values must be in [-1, N) with N = {num_prefixes} bank rows, got values in [{lo}, {hi}]"
            )
    if prefix_lens is not None and prefix_lens.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(prefix_lens)).tolist()
        if lo < 0 or hi > prefix_len:
            raise ValueError(f"prefix_lens values must be in [0, P] with P = {prefix_len}, got values in [{lo}, {hi}]")


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_index: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention in which every query also sees a read-only block of prefix keys/values.

    ``out = softmax(scale * q @ [pk; k]^T + mask) @ [pv; v]``, without concatenating the prefix, copying
    it per batch row, or building a 4-D mask.

    Args:
        q: ``[B, Hq, T, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` keys and values of the sequence, ``S >= T`` (the first ``S - T`` are earlier
            tokens held in a KV cache). ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA).
        prefix_k, prefix_v: ``[N, Hkv, P, D]`` a bank of ``N`` prefixes, read-only. ``P`` may be 0.
        prefix_index: ``[B]`` integer, the bank row each batch row uses, ``-1`` for none. ``None``: every row
            uses row 0 (then ``N`` must be 1).
        prefix_lens: ``[N]`` integer, the valid length (``<= P``) of each bank row. ``None``: all ``P``.
        key_padding_mask: ``[B, S]`` bool (or 0/1 integer), ``True`` for a real token.
        causal: over the sequence part, aligned bottom-right: query ``t`` sees keys ``s <= S - T + t``.
            Prefix columns are visible to every query of the row.
        scale: logit scale, default ``D ** -0.5``.
        dropout_p: attention dropout probability in ``[0, 1)`` (pass 0 in eval).
        return_lse: also return the log-sum-exp ``[B, Hq, T]`` float32 (for merging; differentiable).

    Returns:
        ``out`` ``[B, Hq, T, D]`` in the dtype of ``q``, or ``(out, lse)``. A query with nothing to attend
        to gives zeros (and ``lse = -inf``). Gradients flow to ``q, k, v, prefix_k, prefix_v``; the prefix
        gradient is summed over the rows that used each bank row.
    """
    args = _normalise(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lens,
        key_padding_mask,
        causal,
        scale,
        dropout_p,
        check_values=not torch.compiler.is_compiling(),
    )
    return _run(args, return_lse=return_lse)


def prefix_attention_checked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    prefix_index: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefix_attention` for callers that already ran :func:`check_index_values` on these index tensors.

    Shapes, dtypes and devices are still checked (no sync); the value-range checks are skipped.
    """
    args = _normalise(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lens,
        key_padding_mask,
        causal,
        scale,
        dropout_p,
        check_values=False,
    )
    return _run(args, return_lse=return_lse)


def _filled(n: int, value: int, device: torch.device) -> torch.Tensor:
    """A read-only int32 [n] tensor of ``value``: the default ``prefix_index`` or ``prefix_lens``.

    Every layer of every decoding step needs one; the cache saves an allocation and a fill launch per
    call. Not cached, and not taken from the cache, while tracing (fake tensors: torch.compile, make_fx,
    any dispatch mode) or during CUDA graph capture (the fill would only be recorded, and the memory would
    belong to the graph's pool). The cache is never evicted, so a captured graph that read an entry keeps
    a live tensor; it holds one small tensor per (n, value, device) seen. A CUDA entry remembers the stream
    that filled it, and another stream waits for that fill on the device.
    """
    tracing = torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
    if tracing or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((n,), value, dtype=torch.int32, device=device)
    key = (n, value, device)
    if key not in _FILLED:
        # made outside inference mode: the op saves it for backward, which an inference tensor refuses
        with torch.inference_mode(False):
            filled = torch.full((n,), value, dtype=torch.int32, device=device)
        ready = None
        if device.type == "cuda":
            ready = (torch.cuda.current_stream(device), torch.cuda.Event())
            ready[1].record(ready[0])
        _FILLED[key] = (filled, ready)
    filled, ready = _FILLED[key]
    if ready is not None and torch.cuda.current_stream(device) != ready[0]:
        # the fill ran on another stream: order this stream after it (no host wait)
        torch.cuda.current_stream(device).wait_event(ready[1])
    return filled


_FILLED: dict[tuple[int, int, torch.device], tuple[torch.Tensor, tuple | None]] = {}


def _normalise(
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, key_padding_mask, causal, scale, dropout_p, *, check_values
):
    q = _check_tensor("q", q, 4)
    k = _check_tensor("k", k, 4)
    v = _check_tensor("v", v, 4)
    prefix_k = _check_tensor("prefix_k", prefix_k, 4)
    prefix_v = _check_tensor("prefix_v", prefix_v, 4)
    named = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, x in named.items():
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all five tensors must share a dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all tensors must be on one device")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, S, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"prefix_k and prefix_v must have the same shape [N, Hkv, P, D], "
            f"got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    _, Hkv, S, Dk = k.shape
    N, Hkv_p, P, Dp = prefix_k.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}")
    if Dk != D or Dp != D:
        raise ValueError(f"head dims differ: q has D={D}, k/v have {Dk}, prefix_k/prefix_v have {Dp}")
    if Hkv_p != Hkv:
        raise ValueError(f"prefix_k has {Hkv_p} heads but k has Hkv={Hkv}; the prefix must have the KV heads of k")
    if B < 1 or D < 1:
        raise ValueError(f"q must have a batch size and a head dim of at least 1, got shape {tuple(q.shape)}")
    if Hkv == 0 or Hq == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has Hq={Hq} heads, which must be a positive multiple of k's Hkv={Hkv} heads")
    if T < 1 or S < T:
        raise ValueError(f"k/v have S={S} keys and q has T={T} queries; need S >= T >= 1")
    if N < 1:
        raise ValueError("prefix_k must hold at least one bank row (N >= 1); use P = 0 for an empty prefix")
    if prefix_index is not None:
        prefix_index = _check_index_tensor("prefix_index", prefix_index, B, "B", q.device)
    if prefix_lens is not None:
        prefix_lens = _check_index_tensor("prefix_lens", prefix_lens, N, "N", q.device)
    if check_values:
        check_index_values(prefix_index, prefix_lens, N, P)
    if prefix_index is None:
        if N != 1:
            raise ValueError(f"prefix_index is required when the bank holds N={N} > 1 prefixes")
        prefix_index = _filled(B, 0, q.device)
    else:
        prefix_index = prefix_index.to(torch.int32).contiguous()
    prefix_lens = _filled(N, P, q.device) if prefix_lens is None else prefix_lens.to(torch.int32).contiguous()
    if key_padding_mask is not None:
        key_padding_mask = _check_tensor("key_padding_mask", key_padding_mask, 2)
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"key_padding_mask must have shape [B, S] = [{B}, {S}], got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        key_padding_mask = key_padding_mask.to(torch.bool).contiguous()
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = D**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (0 < float(scale) < float("inf")):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return (
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_index,
        prefix_lens,
        key_padding_mask,
        causal,
        float(scale),
        float(dropout_p),
    )


def _run(args: tuple, *, return_lse: bool):
    """Call the op on ``_normalise``'s arguments: through the custom op when autograd or tracing needs it."""
    tensors, dropout_p = args[:5], args[-1]
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0 else None
    needs_graph = torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))
    forward = _prefix_attention_fwd if needs_graph else _forward_impl
    out, lse = forward(*args, seed, _requested_backend(), return_lse)
    return (out, lse) if return_lse else out
