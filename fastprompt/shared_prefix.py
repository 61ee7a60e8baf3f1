"""Shared-prefix decode: rows that use the same bank row read it once per step, for the whole group.

In serving, many batch rows name one bank row (a cached few-shot prompt, one adapter for many users).
A decode step then splits attention in two parts over disjoint keys and merges them by log-sum-exp
(:func:`fastprompt.merge_attention_states`), the cascade of Hydragen and FlashInfer:

- the prefix part: for each bank row ``n``, the queries of every row that uses it (rows x T x the
  ``Hq / Hkv`` query heads of a KV head) are stacked into one matrix, so each prefix tile is read once
  and multiplied against all of them (:func:`grouped_prefix_attention`);
- the sequence part: each row's own KV cache (real tokens only), through the op with an empty prefix.

The grouping is fixed for a batch across its decode steps, so it is computed once, on the host, by
:meth:`SharedPrefixPlan.build`; the serving layer keeps the plan and passes it to every step and layer.

Forward only: this is the inference path. Training keeps :func:`fastprompt.prefix_attention`, whose
backward sums the prefix gradient over the rows of each bank row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace

import torch

from fastprompt import ops
from fastprompt.merge import merge_attention_states

__all__ = ["SharedPrefixPlan", "grouped_prefix_attention", "shared_prefix_decode"]


@dataclass(frozen=True, eq=False)  # identity equality: fields hold tensors
class SharedPrefixPlan:
    """Batch rows grouped by the bank row they use, for one batch (built once, kept across decode steps).

    Group ``g`` holds the batch rows ``order[group_starts[g]:group_starts[g + 1]]`` (in batch order), which
    all read the first ``group_lens[g]`` keys of bank row ``group_banks[g]``. Rows with no prefix
    (``prefix_index = -1``) or a bank row of length 0 form one last group with bank row -1 and length 0,
    so every batch row is in exactly one group. Tensors are int32 on :attr:`device`; ``groups`` holds the
    same on the host (``(bank row, length, first, end)`` per group), so no step reads the device for them.
    """

    batch_size: int
    num_prefixes: int
    prefix_len: int
    order: torch.Tensor  # [B] int32, a permutation of the batch rows
    group_starts: torch.Tensor  # [G + 1] int32
    group_banks: torch.Tensor  # [G] int32
    group_lens: torch.Tensor  # [G] int32
    groups: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def build(
        cls,
        prefix_index: torch.Tensor,
        prefix_lens: torch.Tensor | None = None,
        *,
        num_prefixes: int,
        prefix_len: int,
    ) -> SharedPrefixPlan:
        """Group the rows of a batch by bank row.

        Args:
            prefix_index: ``[B]`` integer, the bank row of each batch row, ``-1`` for none.
            prefix_lens: ``[N]`` integer, the valid length (``<= P``) of each bank row; ``None``: all ``P``.
            num_prefixes: ``N``, the bank rows of ``prefix_k`` ``[N, Hkv, P, D]``.
            prefix_len: ``P``.

        Reads the index tensors once (a device sync when they live on a GPU); the plan's tensors live on
        ``prefix_index``'s device.
        """
        if not isinstance(prefix_index, torch.Tensor) or prefix_index.dim() != 1:
            raise ValueError(f"prefix_index must be a 1-D tensor [B], got {_describe(prefix_index)}")
        if prefix_index.dtype.is_floating_point or prefix_index.dtype.is_complex or prefix_index.dtype == torch.bool:
            raise TypeError(f"prefix_index must be an integer tensor, got {prefix_index.dtype}")
        if prefix_index.numel() < 1:
            raise ValueError("prefix_index must name the bank row of at least one batch row, got an empty tensor")
        if num_prefixes < 1 or prefix_len < 0:
            raise ValueError(f"need num_prefixes >= 1 and prefix_len >= 0, got {num_prefixes} and {prefix_len}")
        index = prefix_index.detach().to("cpu", torch.int64).tolist()
        if min(index) < -1 or max(index) >= num_prefixes:
            raise ValueError(
                f"prefix_index values must be in [-1, N) with N = {num_prefixes} bank rows, "
                f"got values in [{min(index)}, {max(index)}]"
            )
        if prefix_lens is None:
            lens = [prefix_len] * num_prefixes
        else:
            if not isinstance(prefix_lens, torch.Tensor) or tuple(prefix_lens.shape) != (num_prefixes,):
                raise ValueError(f"prefix_lens must have shape [N] = [{num_prefixes}], got {_describe(prefix_lens)}")
            if prefix_lens.dtype.is_floating_point or prefix_lens.dtype.is_complex or prefix_lens.dtype == torch.bool:
                raise TypeError(f"prefix_lens must be an integer tensor, got {prefix_lens.dtype}")
            lens = prefix_lens.detach().to("cpu", torch.int64).tolist()
            if min(lens) < 0 or max(lens) > prefix_len:
                raise ValueError(
                    f"prefix_lens values must be in [0, P] with P = {prefix_len}, "
                    f"got values in [{min(lens)}, {max(lens)}]"
                )
        members: dict[int, list[int]] = {}
        for b, n in enumerate(index):
            members.setdefault(n if n >= 0 and lens[n] > 0 else -1, []).append(b)
        banks = sorted(n for n in members if n >= 0) + ([-1] if -1 in members else [])
        order, groups = [], []
        for n in banks:
            groups.append((n, lens[n] if n >= 0 else 0, len(order), len(order) + len(members[n])))
            order.extend(members[n])

        def int32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=prefix_index.device)

        return cls(
            batch_size=len(index),
            num_prefixes=num_prefixes,
            prefix_len=prefix_len,
            order=int32(order),
            group_starts=int32([g[2] for g in groups] + [len(order)]),
            group_banks=int32([g[0] for g in groups]),
            group_lens=int32([g[1] for g in groups]),
            groups=tuple(groups),
        )

    @property
    def device(self) -> torch.device:
        return self.order.device

    @property
    def max_group_rows(self) -> int:
        """Batch rows in the largest group."""
        return max(end - first for _, _, first, end in self.groups)

    @property
    def max_len(self) -> int:
        """Keys in the longest group's prefix (0 when no row has one)."""
        return max(length for _, length, _, _ in self.groups)

    def to(self, device: torch.device | str) -> SharedPrefixPlan:
        """The same plan with its tensors on ``device``."""
        return replace(
            self,
            order=self.order.to(device),
            group_starts=self.group_starts.to(device),
            group_banks=self.group_banks.to(device),
            group_lens=self.group_lens.to(device),
        )

    def check(self, q: torch.Tensor, prefix_k: torch.Tensor) -> None:
        """Raise ``ValueError`` unless this plan was built for ``q`` [B, Hq, T, D] and the bank [N, Hkv, P, D]."""
        B, N, P = q.shape[0], prefix_k.shape[0], prefix_k.shape[2]
        if (self.batch_size, self.num_prefixes, self.prefix_len) != (B, N, P):
            raise ValueError(
                f"the plan was built for B={self.batch_size} rows and a bank of N={self.num_prefixes} prefixes of "
                f"P={self.prefix_len} keys, got B={B}, N={N}, P={P}; build a plan for this batch"
            )
        if self.device != q.device:
            raise ValueError(f"the plan's tensors are on {self.device} but q is on {q.device}; use plan.to(device)")


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# ---------------------------------------------------------------------------------------------------
# The prefix part
# ---------------------------------------------------------------------------------------------------


def _grouped_torch(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, plan: SharedPrefixPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable statement of :func:`grouped_prefix_attention`: one loop over the groups."""
    B, Hq, T, D = q.shape
    Hkv = prefix_k.shape[1]
    group = Hq // Hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, Hq, T, D, dtype=compute, device=q.device)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=compute, device=q.device)
    for n, length, first, end in plan.groups:
        if length == 0:
            continue
        rows = plan.order[first:end].long()
        R = end - first
        # [Hkv, R * group * T, D]: every query of the group that reads KV head h is a row of one matrix
        stacked = q[rows].to(compute).reshape(R, Hkv, group * T, D).transpose(0, 1).reshape(Hkv, -1, D)
        logits = scale * stacked @ prefix_k[n, :, :length].to(compute).transpose(1, 2)  # [Hkv, R * group * T, L]
        row_lse = torch.logsumexp(logits, dim=-1)  # every prefix key is visible, so finite
        row_out = torch.exp(logits - row_lse[..., None]) @ prefix_v[n, :, :length].to(compute)
        out[rows] = row_out.reshape(Hkv, R, group * T, D).transpose(0, 1).reshape(R, Hq, T, D)
        lse[rows] = row_lse.reshape(Hkv, R, group * T).transpose(0, 1).reshape(R, Hq, T)
    return out.to(q.dtype), lse.float()


def _grouped_cpu(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, plan: SharedPrefixPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastprompt import _cpp

    _cpp.load()
    return torch.ops.fastprompt.grouped_prefix_attention_cpu(
        q, prefix_k, prefix_v, plan.order, plan.group_starts, plan.group_banks, plan.group_lens, float(scale)
    )


def _grouped_triton(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, plan: SharedPrefixPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = importlib.import_module("fastprompt.kernels.shared_prefix")
    return kernels.grouped_prefix_attention(q, prefix_k, prefix_v, plan, scale)


_GROUPED = {"torch": _grouped_torch, "cpu": _grouped_cpu, "triton": _grouped_triton}


def _resolve(backend: str | None, q: torch.Tensor) -> str:
    requested = ops._requested_backend() if backend is None else backend
    if requested != "auto" and requested not in ops.BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(ops.BACKENDS)} or None; got {requested!r}")
    return ops._resolve_backend(requested, q.device, q.dtype, q.shape[-1])


def _check_shapes(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, plan: SharedPrefixPlan) -> None:
    for name, x in (("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {_describe(x)}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"prefix_k and prefix_v must have the same shape [N, Hkv, P, D], "
            f"got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    Hq, D, Hkv = q.shape[1], q.shape[3], prefix_k.shape[1]
    if prefix_k.shape[3] != D:
        raise ValueError(f"head dims differ: q has D={D}, prefix_k/prefix_v have {prefix_k.shape[3]}")
    if Hkv == 0 or Hq == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has Hq={Hq} heads, which must be a positive multiple of the bank's Hkv={Hkv} heads")
    if not isinstance(plan, SharedPrefixPlan):
        raise TypeError(f"plan must be a SharedPrefixPlan, got {type(plan).__name__}")
    plan.check(q, prefix_k)


def grouped_prefix_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    plan: SharedPrefixPlan,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row's queries to its bank row only, each bank row read once for all its rows.

    Args:
        q: ``[B, Hq, T, D]`` queries; query head ``hq`` reads KV head ``hq // (Hq / Hkv)``.
        prefix_k, prefix_v: ``[N, Hkv, P, D]`` the bank.
        plan: the batch's :class:`SharedPrefixPlan`.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"triton" | "cpu" | "torch" | "auto"``; ``None``: ``FASTPROMPT_BACKEND``, default auto.

    Returns:
        ``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)``; a row without a prefix (``-1``, or a
        bank row of length 0) gets ``out = 0`` and ``lse = -inf``. Forward only (no gradients).
    """
    _check_shapes(q, prefix_k, prefix_v, plan)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        return _GROUPED[_resolve(backend, q)](q, prefix_k, prefix_v, plan, scale)


def shared_prefix_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    plan: SharedPrefixPlan,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`fastprompt.prefix_attention` (no dropout) computed as a cascade, for decode steps.

    The prefix part reads each bank row once for all rows that use it (:func:`grouped_prefix_attention`);
    the sequence part is the op with an empty prefix on each row's own cache; the two are merged by
    log-sum-exp. Same semantics and shapes as :func:`fastprompt.prefix_attention`:

    Args:
        q: ``[B, Hq, T, D]``.
        k, v: ``[B, Hkv, S, D]``, ``S >= T``: each row's own tokens (no prefix), the last ``T`` of them new.
        prefix_k, prefix_v: ``[N, Hkv, P, D]`` the bank; ``plan`` says which rows read which bank row.
        key_padding_mask: ``[B, S]`` bool, ``True`` for a real token.
        causal: over the sequence part, aligned bottom-right (query ``t`` sees keys ``s <= S - T + t``).
        scale: default ``D ** -0.5``.
        backend: one backend for both parts; ``None``: ``FASTPROMPT_BACKEND``, default auto. A backend
            asked for by name that cannot run these tensors raises
            :class:`~fastprompt.errors.BackendUnavailableError`.

    Returns:
        ``out`` ``[B, Hq, T, D]`` in q's dtype; a query with nothing to attend to gives zeros.
        Forward only: inputs that require grad raise (train with :func:`fastprompt.prefix_attention`).
    """
    if torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, prefix_k, prefix_v)
    ):
        raise RuntimeError(
            "shared_prefix_decode is forward only (decode); for gradients use fastprompt.prefix_attention, "
            "or call it under torch.no_grad() / torch.inference_mode()"
        )
    _check_shapes(q, prefix_k, prefix_v, plan)
    name = _resolve(backend, q)
    empty = prefix_k.new_empty(1, prefix_k.shape[1], 0, prefix_k.shape[3])
    args = ops._normalise(
        q, k, v, empty, empty, None, None, key_padding_mask, causal, scale, 0.0, check_values=False
    )
    scale = args[9]
    with torch.no_grad():
        seq_out, seq_lse = ops._backend_module(name).forward(*args, 0)
        prefix_out, prefix_lse = _GROUPED[name](q, prefix_k, prefix_v, plan, scale)
        out, _ = merge_attention_states(prefix_out, prefix_lse, seq_out, seq_lse)
    return out
