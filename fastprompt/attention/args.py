"""The op's argument record: built and validated once at the public boundary, read by every backend.

:class:`AttentionArgs` is the whole contract between :func:`fastprompt.prefix_attention` and a backend.
The custom ops' schemas are generated from its fields (:func:`op_schema`), so adding an argument means
adding a field here and reading it in each backend, nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["FLOAT_DTYPES", "AttentionArgs", "Requirements", "check_index_values", "op_schema"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Requirements(NamedTuple):
    """What a backend must support to run a call (see :meth:`Backend.not_supported_reasons`)."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    dropout: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """One call of the op. Shapes and meanings as in :func:`fastprompt.prefix_attention`.

    Built raw from the public arguments, then checked and normalised once by :meth:`validated`; a
    backend only ever receives a validated record. In a validated record ``prefix_index`` and
    ``prefix_lens`` are int32 or ``None`` (``None`` means every row uses bank row 0 and every bank row is
    ``P`` long; the torch backend then skips the per-row gather and scatter, the C++ one makes its [B] zero
    index itself, the Triton one reads row 0), ``key_padding_mask`` is
    contiguous bool or ``None``, ``scale`` is a float, and ``seed`` is a 0-d int64 tensor (the dropout seed;
    a tensor so that a compiled graph does not bake one value in) or ``None`` without dropout.
    """

    q: torch.Tensor  # [B, Hq, T, D]
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor  # [B, Hkv, S, D]
    prefix_k: torch.Tensor  # [N, Hkv, P, D]
    prefix_v: torch.Tensor  # [N, Hkv, P, D]
    prefix_index: torch.Tensor | None = None  # [B] int32
    prefix_lens: torch.Tensor | None = None  # [N] int32
    key_padding_mask: torch.Tensor | None = None  # [B, S] bool
    causal: bool = True
    scale: float | None = None  # None (raw only): D ** -0.5
    dropout_p: float = 0.0
    seed: torch.Tensor | None = None  # [] int64

    DIFFERENTIABLE = ("q", "k", "v", "prefix_k", "prefix_v")

    def validated(self, check_values: bool = True) -> AttentionArgs:
        """The record with every argument checked (shapes, dtypes, devices, and with ``check_values`` the
        index ranges, which reads them: a device sync on CUDA) and normalised; raises ``TypeError`` or
        ``ValueError`` naming the argument. A seed is drawn when there is dropout and none was given."""
        q, k, v, prefix_k, prefix_v = inputs = self.inputs
        prefix_index, prefix_lens, key_padding_mask = self.prefix_index, self.prefix_lens, self.key_padding_mask
        causal, scale, dropout_p = self.causal, self.scale, self.dropout_p
        _check_tensor("q", q, 4)
        dtype, device = q.dtype, q.device
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {dtype}")
        for name, x in zip(self.DIFFERENTIABLE[1:], inputs[1:], strict=True):
            _check_tensor(name, x, 4)
            if x.dtype != dtype:
                if x.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
                raise TypeError(f"{name} has dtype {x.dtype} but q has {dtype}; all five tensors must share a dtype")
            if x.device != device:
                raise ValueError(f"{name} is on {x.device} but q is on {device}; all tensors must be on one device")
        B, Hq, T, D = q.shape
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape [B, Hkv, S, D], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
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
            raise ValueError(
                f"prefix_k has {Hkv_p} heads but k has Hkv={Hkv}; the prefix must have the KV heads of k"
            )
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
        elif N != 1:
            raise ValueError(f"prefix_index is required when the bank holds N={N} > 1 prefixes")
        if prefix_lens is not None:
            prefix_lens = _check_index_tensor("prefix_lens", prefix_lens, N, "N", q.device)
        if check_values:
            check_index_values(prefix_index, prefix_lens, N, P)
        if key_padding_mask is not None:
            _check_tensor("key_padding_mask", key_padding_mask, 2)
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
        seed = None
        if dropout_p > 0:
            seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if self.seed is None else self.seed
        return AttentionArgs(
            q, k, v, prefix_k, prefix_v,
            None if prefix_index is None else prefix_index.to(torch.int32).contiguous(),
            None if prefix_lens is None else prefix_lens.to(torch.int32).contiguous(),
            key_padding_mask, causal, float(scale), float(dropout_p), seed,
        )  # fmt: skip

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """``(q, k, v, prefix_k, prefix_v)``: the differentiable tensors, in :attr:`DIFFERENTIABLE` order."""
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v)

    def with_inputs(self, inputs: Sequence[torch.Tensor]) -> AttentionArgs:
        """The record with ``(q, k, v, prefix_k, prefix_v)`` replaced (e.g. by float64 leaves for an oracle)."""
        return dataclasses.replace(self, **dict(zip(self.DIFFERENTIABLE, inputs, strict=True)))

    @property
    def requirements(self) -> Requirements:
        return Requirements(self.q.device, self.q.dtype, self.q.shape[-1], self.dropout_p > 0)

    @property
    def seed_value(self) -> int:
        """The dropout seed as a Python int (0 without dropout)."""
        return 0 if self.seed is None else int(self.seed.item())

    def flat(self) -> tuple:
        """The fields in declaration order: the record's part of a custom op's arguments."""
        return tuple(getattr(self, name) for name in _FIELD_NAMES)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensor fields (for ``ctx.save_for_backward``); :meth:`with_tensors` puts them back."""
        return tuple(getattr(self, name) for name in _TENSOR_FIELDS)

    def with_tensors(self, tensors: tuple[torch.Tensor | None, ...]) -> AttentionArgs:
        return dataclasses.replace(self, **dict(zip(_TENSOR_FIELDS, tensors, strict=True)))

    @classmethod
    def gradients(cls, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        """One gradient per field (``None`` for the non-differentiable ones) from the gradients of
        :attr:`DIFFERENTIABLE`, in that order."""
        by_name = dict(zip(cls.DIFFERENTIABLE, grads, strict=True))
        return tuple(by_name.get(f.name) for f in dataclasses.fields(cls))


# A validated record always holds a float scale, so ``float | None`` (raw only) is a plain float in the schema.
_SCHEMA_TYPES = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "bool": "bool",
    "float": "float",
    "float | None": "float",
}
_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionArgs) if f.type.startswith("torch.Tensor"))
# Read on every call of the op, where dataclasses.fields() would cost microseconds.
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AttentionArgs))


def op_schema(leading: str, returns: str) -> str:
    """A custom-op schema ``(<leading>, <the record's fields>) -> <returns>``.

    The record's fields come last so that an implementation reads ``def impl(<leading>, *fields)`` and
    rebuilds the record with ``AttentionArgs(*fields)``.
    """
    fields = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(AttentionArgs))
    return f"({leading + ', ' if leading else ''}{fields}) -> {returns}"


def _check_tensor(name: str, x: object, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_integer(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def _check_index_tensor(name: str, x: object, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    x = _check_integer(name, _check_tensor(name, x, 1))
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
    index tensors (every layer of a model) check once and then pass ``check_values=False``.
    """
    for name, x in (("prefix_index", prefix_index), ("prefix_lens", prefix_lens)):
        if x is not None:
            _check_integer(name, _check_tensor(name, x, 1))
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
