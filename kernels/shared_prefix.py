"""Triton kernel of the shared-prefix decode: the prefix part, each bank row read once for its whole group.

``_grouped_prefix_kernel``: grid (groups * Hkv, row tiles, splits). A group is the batch rows that use one
bank row (``fastprompt.shared_prefix.SharedPrefixPlan``); its queries for KV head ``hkv`` (rows x T x the
``Hq / Hkv`` query heads) are stacked into the M dimension, so each prefix tile loaded by a program is
multiplied (``tl.dot``) against up to BLOCK_M queries of many batch rows, where the per-row kernels load
it once per row. The prefix columns are split across programs to fill the GPU when groups are few; each
split writes a normalised partial output and its log-sum-exp, merged by ``prefix_attention``'s
``_merge_kernel``. Every prefix key is visible to every query of its row, so no mask beyond the bank
row's length is needed. Forward only: decode is inference; training keeps the per-row kernels, whose
backward sums the prefix gradient over the rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastprompt.kernels.prefix_attention import (
    _MAX_SPLITS,
    _block_d,
    _config,
    _finish_rows,
    _grid,
    _load_rows,
    _merge_kernel,
    _precision,
    _softmax_step,
    _strides,
    _target_programs,
)


@triton.jit
def _grouped_prefix_kernel(
    Q, PK, PV, Order, GroupStarts, GroupBanks, GroupLens, OutPart, LsePart,
    sqb, sqh, sqt, sqd, spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
    Hq, T, D, n_rows, cols_per_split, qk_scale,
    GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    gk = tl.program_id(0)
    split = tl.program_id(2)
    Hkv = Hq // GROUP
    g = gk // Hkv
    hkv = gk % Hkv
    first = tl.load(GroupStarts + g)
    stacked = (tl.load(GroupStarts + g + 1) - first) * GROUP * T
    bank = tl.maximum(tl.load(GroupBanks + g), 0)  # the no-prefix group (-1) has length 0: reads nothing
    length = tl.load(GroupLens + g)

    # Stacked row r is query t = r % T of head hkv * GROUP + (r // T) % GROUP of batch row
    # Order[first + r // (GROUP * T)].
    tile_start = tl.program_id(1) * BLOCK_M
    offs_r = tile_start + tl.arange(0, BLOCK_M)
    r_ok = offs_r < stacked
    b = tl.load(Order + first + offs_r // (GROUP * T), mask=r_ok, other=0)
    hq = hkv * GROUP + (offs_r // T) % GROUP
    t = offs_r % T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_rows(Q, b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + t.to(tl.int64) * sqt, r_ok, offs_d, d_ok, sqd)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    col_lo = split * cols_per_split
    # A tile past the group's last row (groups differ in size; the grid fits the largest) reads nothing.
    col_hi = tl.where(tile_start < stacked, tl.minimum(col_lo + cols_per_split, length), col_lo)
    pk_base = PK + bank.to(tl.int64) * spkn + hkv.to(tl.int64) * spkh
    pv_base = PV + bank.to(tl.int64) * spvn + hkv.to(tl.int64) * spvh
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < col_hi
        k = _load_rows(pk_base, offs_n * spkp, n_ok, offs_d, d_ok, spkd)
        v = _load_rows(pv_base, offs_n * spvp, n_ok, offs_d, d_ok, spvd)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, r_ok[:, None] & n_ok[None, :], offs_r, offs_n,
                                      0, 0.0, qk_scale, False, PRECISION)
    out, lse = _finish_rows(acc, l_i, m_i)
    part_rows = split.to(tl.int64) * n_rows + (b.to(tl.int64) * Hq + hq) * T + t
    tl.store(OutPart + part_rows[:, None] * D + offs_d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LsePart + part_rows, lse, mask=r_ok)


def grouped_prefix_attention(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, plan, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix part of a shared-prefix decode step: ``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32)``.

    q [B, Hq, T, D]; prefix_k, prefix_v [N, Hkv, P, D] (any strides); ``plan`` a
    ``fastprompt.shared_prefix.SharedPrefixPlan`` for this batch with its tensors on q's device (its host
    copies size the grid, so the launch reads nothing from the device). Rows without a prefix get
    ``out = 0`` and ``lse = -inf``. Forward only.
    """
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype
    assert q.shape[-1] <= 256, "tiles are sized for head dims up to 256"
    B, Hq, T, D = q.shape
    Hkv = prefix_k.shape[1]
    group = Hq // Hkv
    n_groups = len(plan.groups)
    cfg = _config(q, "decode")
    stacked = plan.max_group_rows * group * T
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(stacked)))
    row_tiles = triton.cdiv(stacked, block_m)
    max_len = max(plan.max_len, 1)
    n_splits = max(1, min(triton.cdiv(_target_programs(q.device), n_groups * Hkv * row_tiles),
                          triton.cdiv(max_len, cfg.block_n), _MAX_SPLITS))
    cols_per_split = triton.cdiv(triton.cdiv(max_len, n_splits), cfg.block_n) * cfg.block_n
    n_splits = triton.cdiv(max_len, cols_per_split)
    n_rows = B * Hq * T
    # Every (row, split) pair is written: each row is in one group, and each of its programs writes every split.
    out_part = torch.empty(n_splits, n_rows, D, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(n_splits, n_rows, dtype=torch.float32, device=q.device)
    _grouped_prefix_kernel[_grid(n_groups * Hkv, row_tiles, n_splits)](
        q, prefix_k, prefix_v, plan.order, plan.group_starts, plan.group_banks, plan.group_lens,
        out_part, lse_part, *_strides(q, prefix_k, prefix_v),
        Hq, T, D, n_rows, cols_per_split, scale * 1.4426950408889634,
        GROUP=group, PRECISION=_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    block_r = 16
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        out_part, lse_part, out, lse, n_rows, n_splits, D, BLOCK_R=block_r, BLOCK_D=_block_d(D),
    )
    return out, lse
