"""Triton backend of the prefix-attention op: tiled forward, backward and a split-K decode path.

The prefix bank ``prefix_k, prefix_v`` [N, Hkv, P, D] is a read-only block next to the sequence keys
``k, v`` [B, Hkv, S, D]: every kernel walks the prefix tiles of the row's bank entry
(``prefix_index[b]``, cut at ``prefix_lens``) and then the sequence tiles, with the same online softmax,
so nothing is concatenated, copied per row or masked through a 4-D tensor. Query head ``hq`` reads kv
head ``hq // (Hq // Hkv)``.

Kernels (FlashAttention-2 structure, scores in base 2 with ``qk_scale = scale * log2(e)``):

- ``_fwd_kernel``: grid (B * Hq, T / BLOCK_M); one query tile against all visible key tiles. Causal
  sequence tiles entirely to the right of the tile's last query are never visited.
- ``_decode_kernel`` + ``_merge_kernel`` (T <= 16): the M dimension packs the ``Hq / Hkv`` query heads
  of one kv head (GQA rows share every K/V load); the key columns ``[0, P + S)`` are split across
  programs, each writing a normalised partial output and its log-sum-exp, merged by log-sum-exp.
- ``_grouped_prefix_kernel`` (decode calls whose rows share bank rows, no dropout): grid (bank rows x
  Hkv, splits, row tiles); the queries of every row using a bank row are stacked in M, so each prefix
  tile is loaded once per group instead of once per row. Its splits and those of ``_decode_kernel`` run
  on the sequence part alone land in one buffer, merged by ``_merge_kernel`` (a cascade).
- ``_bwd_delta_kernel``: ``delta = rowsum(dO * O)``.
- ``_bwd_dq_kernel``: grid like the forward; accumulates dq over the prefix and sequence tiles.
- ``_bwd_dkdv_kernel``: grid (B * Hkv, S / BLOCK_N); one sequence key tile, looping over the query
  heads of its group and the query tiles that can see it, so dk/dv need no atomics.
- ``_bwd_dprefix_kernel``: grid (N * Hkv, P / BLOCK_N, splits); one bank key tile, looping over the batch
  rows whose ``prefix_index`` is that bank row (see the kernel for how the sum stays deterministic).

Dropout keeps probability (b, hq, t, c) iff a Philox draw keyed by the counters
``(c, (b * Hq + hq) * T + t)`` is >= p, where c is the prefix column j or P + s for sequence column s;
every kernel derives the same keep mask from those counters, so backward never stores it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_DECODE_MAX_T = 16
# Shortest prefix for which a decode step groups rows by bank row: below it a row reads few prefix tiles,
# and the grouped path's extra launches (sort, a second kernel) cost more than the shared reads save.
_GROUP_MIN_PREFIX = 256
# Most bank rows for which a decode step groups rows: its grid holds a program per (bank row, row tile of
# the whole batch), mostly empty when many bank rows split the batch, so it grows as N * B / (B / N).
_GROUP_MAX_BANK_ROWS = 64
_MAX_SPLITS = 64

# ----------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        # The interpreter (triton 3.9) multiplies bf16 tiles as their raw uint16 bit patterns. Products of
        # fp16/bf16 values are exact in fp32, so upcasting gives what the GPU's fp32 accumulation gives.
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _row_bank(PI, b, HAS_INDEX: tl.constexpr):
    """The bank row of batch row ``b`` (-1: none); without an index tensor every row uses row 0."""
    if HAS_INDEX:
        return tl.load(PI + b)
    else:
        return b * 0


@triton.jit
def _bank_len(PL, n, P, HAS_LENS: tl.constexpr):
    """The valid length of bank row ``n`` (0 for ``n = -1``); without a lengths tensor every row has P."""
    if HAS_LENS:
        return tl.where(n >= 0, tl.load(PL + tl.maximum(n, 0)), 0)
    else:
        return tl.where(n >= 0, P, 0)


@triton.jit
def _load_rows(base, row_off, row_ok, offs_d, d_ok, stride_d):
    """A [rows, BLOCK_D] tile; masked rows and the padding past D read as 0 (so dots ignore them)."""
    return tl.load(
        base + row_off[:, None] + offs_d[None, :] * stride_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )


@triton.jit
def _visible(t, t_ok, key_ok, key_pos, shift, CAUSAL: tl.constexpr):
    """Visibility of (query t, key) pairs; arguments broadcast, so either orientation can be asked for.

    ``shift = S - T`` for sequence keys (causal, bottom-right aligned), unused for prefix keys.
    """
    vis = t_ok & key_ok
    if CAUSAL:
        vis = vis & (key_pos <= t + shift)
    return vis


@triton.jit
def _dropout_keep(seed, row, col, dropout_p):
    """Keep mask for probabilities at (row, col), ``row = (b * Hq + hq) * T + t``, ``col`` in [0, P + S).

    Two 32-bit Philox counters (column, row) instead of one flat offset: a flat offset would need
    64-bit arithmetic once B * Hq * T * (P + S) passes 2**32, and wrapping would repeat masks.
    """
    zero = (row * 0 + col * 0).to(tl.uint32)
    c0 = (col + zero).to(tl.uint32)
    c1 = (row + zero).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, vis, drop_row, drop_col, seed, dropout_p, qk_scale,
                  DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update of (acc, l_i, m_i) with a [BLOCK_N, BLOCK_D] key/value tile."""
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key keeps m = -inf; subtracting 0 then avoids exp2(-inf + inf).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    # l sums the un-dropped probabilities: dropout scales what reaches the output, not the normaliser.
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, drop_row[:, None], drop_col[None, :], dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """Normalised output and natural-log lse; rows with no visible key give 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # 0.693... = ln(2): the running max and sum are kept in base 2.
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    return out, lse


@triton.jit
def _attend_prefix_and_sequence(
    acc, l_i, m_i, q, offs_m, m_ok, drop_row, b, hkv,
    K, V, PK, PV, PI, PL, KPM,
    skb, skh, sks, skd, svb, svh, svs, svd,
    spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
    T, S, P, D, col_lo, col_hi, qk_scale, seed, dropout_p,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENS: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax over the key columns [col_lo, col_hi) of row b: prefix columns first, then
    sequence columns (column P + s). The forward passes the whole range, the decode path one split."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    idx = _row_bank(PI, b, HAS_INDEX)
    plen = _bank_len(PL, idx, P, HAS_LENS)
    p_end = tl.minimum(col_hi, plen)
    pk_base = PK + tl.maximum(idx, 0).to(tl.int64) * spkn + hkv.to(tl.int64) * spkh
    pv_base = PV + tl.maximum(idx, 0).to(tl.int64) * spvn + hkv.to(tl.int64) * spvh
    for start_n in range(col_lo, p_end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < p_end
        k = _load_rows(pk_base, offs_n * spkp, n_ok, offs_d, d_ok, spkd)
        v = _load_rows(pv_base, offs_n * spvp, n_ok, offs_d, d_ok, spvd)
        vis = _visible(offs_m[:, None], m_ok[:, None], n_ok[None, :], offs_n[None, :], 0, False)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, vis, drop_row, offs_n, seed, dropout_p,
                                      qk_scale, DROPOUT, PRECISION)

    s_lo = tl.maximum(col_lo - P, 0)
    s_hi = tl.minimum(col_hi - P, S)
    if CAUSAL:
        # Keys right of the last query of the tile are masked for every row of it: never load them.
        s_hi = tl.minimum(s_hi, S - T + tl.max(tl.where(m_ok, offs_m, 0), 0) + 1)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    for start_n in range(s_lo, s_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < s_hi
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b * S + offs_n, mask=n_ok, other=0) != 0)
        k = _load_rows(k_base, offs_n * sks, n_ok, offs_d, d_ok, skd)
        v = _load_rows(v_base, offs_n * svs, n_ok, offs_d, d_ok, svd)
        vis = _visible(offs_m[:, None], m_ok[:, None], n_ok[None, :], offs_n[None, :], S - T, CAUSAL)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, vis, drop_row, P + offs_n, seed, dropout_p,
                                      qk_scale, DROPOUT, PRECISION)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, PI, PL, KPM, Out, Lse,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
    Hq, T, S, P, D, qk_scale, seed, dropout_p,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // Hq
    hq = bh % Hq
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_base = Q + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh
    q = _load_rows(q_base, offs_m * sqt, m_ok, offs_d, d_ok, sqd)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_prefix_and_sequence(
        acc, l_i, m_i, q, offs_m, m_ok, bh * T + offs_m, b, hq // GROUP,
        K, V, PK, PV, PI, PL, KPM,
        skb, skh, sks, skd, svb, svh, svs, svd,
        spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
        T, S, P, D, 0, P + S, qk_scale, seed, dropout_p,
        CAUSAL, HAS_KPM, HAS_INDEX, HAS_LENS, DROPOUT, PRECISION, BLOCK_N, BLOCK_D,
    )
    out, lse = _finish_rows(acc, l_i, m_i)
    rows = bh.to(tl.int64) * T + offs_m
    tl.store(Out + rows[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + rows, lse, mask=m_ok)


@triton.jit
def _decode_kernel(
    Q, K, V, PK, PV, PI, PL, KPM, OutPart, LsePart,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
    Hq, T, S, P, D, n_rows, cols_per_split, qk_scale, seed, dropout_p,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bk = tl.program_id(0)
    split = tl.program_id(1)
    Hkv = Hq // GROUP
    b = bk // Hkv
    hkv = bk % Hkv
    # Row r of the tile is query t = r % T of head hkv * GROUP + r // T.
    offs_r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < GROUP * T
    t = offs_r % T
    hq = hkv * GROUP + offs_r // T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_off = hq.to(tl.int64) * sqh + t * sqt
    q = _load_rows(Q + b.to(tl.int64) * sqb, q_off, r_ok, offs_d, d_ok, sqd)
    rows = (b * Hq + hq) * T + t
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    col_lo = split * cols_per_split
    acc, l_i, m_i = _attend_prefix_and_sequence(
        acc, l_i, m_i, q, t, r_ok, rows, b, hkv,
        K, V, PK, PV, PI, PL, KPM,
        skb, skh, sks, skd, svb, svh, svs, svd,
        spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
        T, S, P, D, col_lo, col_lo + cols_per_split, qk_scale, seed, dropout_p,
        CAUSAL, HAS_KPM, HAS_INDEX, HAS_LENS, DROPOUT, PRECISION, BLOCK_N, BLOCK_D,
    )
    out, lse = _finish_rows(acc, l_i, m_i)
    part_rows = split.to(tl.int64) * n_rows + rows
    tl.store(OutPart + part_rows[:, None] * D + offs_d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LsePart + part_rows, lse, mask=r_ok)


@triton.jit
def _grouped_prefix_kernel(
    Q, PK, PV, PL, Order, GroupStarts, OutPart, LsePart,
    sqb, sqh, sqt, sqd, spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd,
    Hq, T, P, D, N, n_rows, cols_per_split, qk_scale,
    GROUP: tl.constexpr, HAS_LENS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    gk = tl.program_id(0)
    split = tl.program_id(1)
    Hkv = Hq // GROUP
    g = gk // Hkv  # bank row g; g = N is the group of rows without a prefix, which reads nothing
    hkv = gk % Hkv
    first = tl.load(GroupStarts + g)
    stacked = (tl.load(GroupStarts + g + 1) - first) * GROUP * T
    length = _bank_len(PL, tl.where(g < N, g, -1), P, HAS_LENS)
    bank = tl.minimum(g, N - 1)

    # Stacked row r is query t = r % T of head hkv * GROUP + (r // T) % GROUP of batch row
    # Order[first + r // (GROUP * T)].
    tile_start = tl.program_id(2) * BLOCK_M
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
    # The grid's row tiles fit the whole batch; a tile past its group's last row reads nothing.
    col_hi = tl.where(tile_start < stacked, tl.minimum(col_lo + cols_per_split, length), col_lo)
    pk_base = PK + bank.to(tl.int64) * spkn + hkv.to(tl.int64) * spkh
    pv_base = PV + bank.to(tl.int64) * spvn + hkv.to(tl.int64) * spvh
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(col_lo, col_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < col_hi
        k = _load_rows(pk_base, offs_n * spkp, n_ok, offs_d, d_ok, spkd)
        v = _load_rows(pv_base, offs_n * spvp, n_ok, offs_d, d_ok, spvd)
        # every prefix key of its bank row is visible to every query of the row
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, r_ok[:, None] & n_ok[None, :], offs_r, offs_n,
                                      0, 0.0, qk_scale, False, PRECISION)
    out, lse = _finish_rows(acc, l_i, m_i)
    part_rows = split.to(tl.int64) * n_rows + (b.to(tl.int64) * Hq + hq) * T + t
    tl.store(OutPart + part_rows[:, None] * D + offs_d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LsePart + part_rows, lse, mask=r_ok)


@triton.jit
def _merge_kernel(OutPart, LsePart, Out, Lse, n_rows, n_splits, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the splits' (out, lse) of each row: out = sum_s exp(lse_s - lse) * out_s."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for split in range(0, n_splits):
        part_rows = split * n_rows + offs_r.to(tl.int64)
        lse_s = tl.load(LsePart + part_rows, mask=r_ok, other=float("-inf"))
        out_s = tl.load(OutPart + part_rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        w = tl.exp(lse_s - m_ref)
        acc = acc * alpha[:, None] + w[:, None] * out_s
        l_i = l_i * alpha + w
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(Out + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + offs_r, lse, mask=r_ok)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(Out, DOut, Delta, sob, soh, sot, sod, sdb, sdh, sdt, sdd, Hq, T, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hq
    hq = bh % Hq
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    o = _load_rows(Out + b.to(tl.int64) * sob + hq.to(tl.int64) * soh, offs_m * sot, m_ok, offs_d, d_ok, sod)
    do = _load_rows(DOut + b.to(tl.int64) * sdb + hq.to(tl.int64) * sdh, offs_m * sdt, m_ok, offs_d, d_ok, sdd)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, delta, mask=m_ok)


@triton.jit
def _row_stats(Lse, Delta, rows, m_ok):
    """lse in base 2 (0 for rows with no visible key, whose scores are all -inf anyway) and delta."""
    lse = tl.load(Lse + rows, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(Delta + rows, mask=m_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, vis, drop_row, drop_col, seed, dropout_p, qk_scale,
             DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS @ K for one key tile (dS without the final `scale`, applied once at the end)."""
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    p = tl.exp2(tl.where(vis, s, float("-inf")) - lse2[:, None])
    dp = _dot(do, tl.trans(v), PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, drop_row[:, None], drop_col[None, :], dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, DO, Lse, Delta, PI, PL, KPM, DQ,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd, sdb, sdh, sdt, sdd,
    Hq, T, S, P, D, scale, qk_scale, seed, dropout_p,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // Hq
    hq = bh % Hq
    hkv = hq // GROUP
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = bh * T + offs_m

    q = _load_rows(Q + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh, offs_m * sqt, m_ok, offs_d, d_ok, sqd)
    do = _load_rows(DO + b.to(tl.int64) * sdb + hq.to(tl.int64) * sdh, offs_m * sdt, m_ok, offs_d, d_ok, sdd)
    lse2, delta = _row_stats(Lse, Delta, rows, m_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    idx = _row_bank(PI, b, HAS_INDEX)
    plen = _bank_len(PL, idx, P, HAS_LENS)
    pk_base = PK + tl.maximum(idx, 0).to(tl.int64) * spkn + hkv.to(tl.int64) * spkh
    pv_base = PV + tl.maximum(idx, 0).to(tl.int64) * spvn + hkv.to(tl.int64) * spvh
    for start_n in range(0, plen, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < plen
        k = _load_rows(pk_base, offs_n * spkp, n_ok, offs_d, d_ok, spkd)
        v = _load_rows(pv_base, offs_n * spvp, n_ok, offs_d, d_ok, spvd)
        vis = _visible(offs_m[:, None], m_ok[:, None], n_ok[None, :], offs_n[None, :], 0, False)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, vis, rows, offs_n, seed, dropout_p, qk_scale,
                      DROPOUT, PRECISION)

    s_hi = S
    if CAUSAL:
        s_hi = tl.minimum(S, S - T + (tl.program_id(1) + 1) * BLOCK_M)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    for start_n in range(0, s_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < S
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b * S + offs_n, mask=n_ok, other=0) != 0)
        k = _load_rows(k_base, offs_n * sks, n_ok, offs_d, d_ok, skd)
        v = _load_rows(v_base, offs_n * svs, n_ok, offs_d, d_ok, svd)
        vis = _visible(offs_m[:, None], m_ok[:, None], n_ok[None, :], offs_n[None, :], S - T, CAUSAL)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, vis, rows, P + offs_n, seed, dropout_p, qk_scale,
                      DROPOUT, PRECISION)

    tl.store(DQ + rows.to(tl.int64)[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_from_queries(
    dk, dv, k, v, key_ok, key_pos, drop_col,
    q_base, do_base, Lse, Delta, sqt, sqd, sdt, sdd, row0, T, D, m_lo, shift, qk_scale, seed, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk/dv of one key tile [BLOCK_N, BLOCK_D] from the queries [m_lo, T) of one (b, hq).

    Works key-major (scores transposed, [BLOCK_N, BLOCK_M]) so dk and dv accumulate without transposes
    of computed tiles. dk comes back without the final `scale`.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_m in range(m_lo, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        q = _load_rows(q_base, offs_m * sqt, m_ok, offs_d, d_ok, sqd)
        do = _load_rows(do_base, offs_m * sdt, m_ok, offs_d, d_ok, sdd)
        lse2, delta = _row_stats(Lse, Delta, row0 + offs_m, m_ok)
        s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale
        vis = _visible(offs_m[None, :], m_ok[None, :], key_ok[:, None], key_pos[:, None], shift, CAUSAL)
        p_t = tl.exp2(tl.where(vis, s_t, float("-inf")) - lse2[None, :])
        dp_t = _dot(v, tl.trans(do), PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, (row0 + offs_m)[None, :], drop_col[:, None], dropout_p)
            p_kept = tl.where(keep, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
        else:
            p_kept = p_t
        dv += _dot(p_kept.to(do.dtype), do, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, KPM, DK, DV,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sdt, sdd,
    Hq, T, S, P, D, scale, qk_scale, seed, dropout_p,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bk = tl.program_id(0)
    Hkv = Hq // GROUP
    b = bk // Hkv
    hkv = bk % Hkv
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = offs_n < S
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + b * S + offs_n, mask=key_ok, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = _load_rows(K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh, offs_n * sks, key_ok, offs_d, d_ok, skd)
    v = _load_rows(V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh, offs_n * svs, key_ok, offs_d, d_ok, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_lo = 0
    if CAUSAL:
        # Query t sees key s iff t >= s - (S - T): earlier query tiles see nothing of this key tile.
        m_lo = tl.maximum(tl.program_id(1) * BLOCK_N - (S - T), 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        hq = hkv * GROUP + g
        dk, dv = _dkdv_from_queries(
            dk, dv, k, v, key_ok, offs_n, P + offs_n,
            Q + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh, DO + b.to(tl.int64) * sdb + hq.to(tl.int64) * sdh,
            Lse, Delta, sqt, sqd, sdt, sdd, (b * Hq + hq) * T, T, D, m_lo, S - T, qk_scale, seed, dropout_p,
            CAUSAL, DROPOUT, PRECISION, BLOCK_M, BLOCK_D,
        )
    out_rows = bk.to(tl.int64) * S + offs_n
    mask = (offs_n < S)[:, None] & d_ok[None, :]
    tl.store(DK + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out_rows[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dprefix_kernel(
    Q, PK, PV, DO, Lse, Delta, PI, PL, DPKPart, DPVPart,
    sqb, sqh, sqt, sqd, spkn, spkh, spkp, spkd, spvn, spvh, spvp, spvd, sdb, sdh, sdt, sdd,
    B, Hq, T, P, D, N, n_splits, scale, qk_scale, seed, dropout_p,
    GROUP: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENS: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of one bank key tile, summed over the batch rows using that bank row.

    The sum over rows and over the group's query heads happens in registers, in a fixed order, so the
    result is deterministic (no atomics). Rows are dealt round-robin to ``n_splits`` programs (split
    s takes rows b = s, s + n_splits, ...) so a bank shared by a large batch still fills the GPU; each
    split writes an fp32 partial [N, Hkv, P, D] and the launcher adds the few partials in a fixed order.
    """
    nk = tl.program_id(0)
    split = tl.program_id(2)
    Hkv = Hq // GROUP
    n = nk // Hkv
    hkv = nk % Hkv
    plen = _bank_len(PL, n, P, HAS_LENS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = offs_n < plen
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    pk = _load_rows(PK + n.to(tl.int64) * spkn + hkv.to(tl.int64) * spkh, offs_n * spkp, key_ok, offs_d, d_ok,
                    spkd)
    pv = _load_rows(PV + n.to(tl.int64) * spvn + hkv.to(tl.int64) * spvh, offs_n * spvp, key_ok, offs_d, d_ok,
                    spvd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # A tile wholly past prefix_lens[n] gets no gradient: skip the rows instead of masking them.
    b_end = tl.where(tl.program_id(1) * BLOCK_N < plen, B, 0)
    for b in range(split, b_end, n_splits):
        if _row_bank(PI, b, HAS_INDEX) == n:
            for g in range(0, GROUP):
                hq = hkv * GROUP + g
                dk, dv = _dkdv_from_queries(
                    dk, dv, pk, pv, key_ok, offs_n, offs_n,
                    Q + tl.cast(b, tl.int64) * sqb + hq.to(tl.int64) * sqh,
                    DO + tl.cast(b, tl.int64) * sdb + hq.to(tl.int64) * sdh,
                    Lse, Delta, sqt, sqd, sdt, sdd, (b * Hq + hq) * T, T, D, 0, 0, qk_scale, seed, dropout_p,
                    False, DROPOUT, PRECISION, BLOCK_M, BLOCK_D,
                )
    out_rows = ((split.to(tl.int64) * N + n) * Hkv + hkv) * P + offs_n
    mask = (offs_n < P)[:, None] & d_ok[None, :]
    tl.store(DPKPart + out_rows[:, None] * D + offs_d[None, :], dk * scale, mask=mask)
    tl.store(DPVPart + out_rows[:, None] * D + offs_d[None, :], dv, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


class Config(NamedTuple):
    """Tile sizes and launch options of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


TileTable = Mapping[str, Config]
"""Configs by kernel name (``"fwd"``, ``"decode"``, ``"dq"``, ``"dkdv"``) that replace the shipped ones."""


def shipped_config(q: torch.Tensor, kernel: str) -> Config:
    """The shipped tile sizes and launch options for ``kernel`` in {"fwd", "decode", "dq", "dkdv"}.

    A fixed table rather than autotuning: for every supported (dtype, head dim) the tiles fit an A100's
    163 KiB of shared memory and fp16/bf16 kernels do not spill registers (beyond a few bytes with
    dropout). CPU tensors (the interpreter) get one small tile; any other device gets the GPU table, so
    ``tests/gpu_compile.py`` can compile it from meta tensors.
    """
    if q.device.type == "cpu":
        return Config(16, 16, 4, 1)
    block_d = _block_d(q.shape[-1])
    if q.dtype == torch.float32:
        # fp32 products run as FMAs with both operands in registers, not on tensor cores: small tiles over
        # 8 warps keep every kernel free of register spills (``tests/gpu_compile.py`` reports them).
        return Config(32 if block_d <= 64 else 16, 32, 8, 2 if block_d <= 128 else 1)
    wide = block_d > 128  # 512-byte K/V rows in shared memory
    warps = 8 if wide else 4
    if kernel in ("fwd", "decode"):
        return Config(64, 32 if wide else 64, warps, 2)
    if kernel == "dq":
        return Config(64, 32, warps, 2)
    # dk and dv accumulate in fp32 registers ([BLOCK_N, BLOCK_D] each): 8 warps from D = 128 on.
    return Config(32, 32 if wide else 64, 8 if block_d >= 128 else 4, 2)


def _config(q: torch.Tensor, kernel: str, tiles: TileTable | None) -> Config:
    return tiles[kernel] if tiles is not None and kernel in tiles else shipped_config(q, kernel)


def _precision(q: torch.Tensor) -> str:
    if q.device.type == "cpu":  # CPU tensors only run under the interpreter (see _dot)
        return "upcast"
    # fp32 inputs get full fp32 products; tf32 would lose ~3 decimal digits. Ignored for fp16/bf16.
    return "ieee" if q.dtype == torch.float32 else "tf32"


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: two per SM on CUDA; a small fixed number under the
    interpreter (keeps both single- and multi-split paths reachable from CPU tests)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _grid(heads: int, *tiles: int) -> tuple[int, ...]:
    """Launch grid ``(heads, *tiles)``: the batch (or bank) x heads product, which grows with the batch,
    on axis 0 (up to 2**31 - 1 programs); tile and split counts on axes 1 and 2, which CUDA caps at 65535."""
    assert heads < 2**31, f"{heads} (batch or bank) x head programs exceed the CUDA grid's axis 0"
    for axis, n in enumerate(tiles, start=1):
        assert n <= 65535, (
            f"{n} tiles on grid axis {axis} exceed CUDA's 65535: the sequence or prefix is too long for "
            "this tile size"
        )
    return (heads, *tiles)


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def _common_args(args) -> tuple[list, dict]:
    """Pointer arguments (Q, K, V, PK, PV, PI, PL, KPM; ``q`` stands in for an absent tensor, never read)
    and the constexprs that say which optional tensors are present."""
    q = args.q
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype
    assert q.shape[-1] <= 256, "tiles are sized for head dims up to 256"
    for x in (args.prefix_index, args.prefix_lens):
        assert x is None or x.dtype == torch.int32
    # bool viewed as uint8 (no copy): the same bytes, loaded as plain integers.
    kpm = None if args.key_padding_mask is None else args.key_padding_mask.view(torch.uint8)
    optional = (args.prefix_index, args.prefix_lens, kpm)
    ptrs = [q, args.k, args.v, args.prefix_k, args.prefix_v, *(q if x is None else x for x in optional)]
    flags = {"HAS_INDEX": args.prefix_index is not None, "HAS_LENS": args.prefix_lens is not None,
             "HAS_KPM": kpm is not None}
    return ptrs, flags


def _forward_general(args, tiles: TileTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward for any T: out [B, Hq, T, D] (q's dtype), lse [B, Hq, T] float32."""
    q, k, prefix_k = args.q, args.k, args.prefix_k
    B, Hq, T, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    ptrs, flags = _common_args(args)
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    cfg = _config(q, "fwd", tiles)
    _fwd_kernel[_grid(B * Hq, triton.cdiv(T, cfg.block_m))](
        *ptrs, out, lse, *_strides(q, k, args.v, prefix_k, args.prefix_v),
        Hq, T, S, P, D, args.scale * 1.4426950408889634, args.seed_value, args.dropout_p,
        GROUP=Hq // Hkv, CAUSAL=args.causal, DROPOUT=args.dropout_p > 0.0, **flags,
        PRECISION=_precision(q), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


class _DecodeGrid(NamedTuple):
    """How ``_decode_kernel`` covers a call: query rows per program and the split of the key columns."""

    block_m: int
    row_blocks: int
    n_splits: int
    cols_per_split: int


def _split_columns(n_cols: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """``(splits, columns per split)``: ``n_cols`` key columns cut in whole tiles, into enough splits that
    ``programs`` programs per split keep the device busy."""
    n_cols = max(n_cols, 1)
    n_splits = max(1, min(triton.cdiv(_target_programs(device), programs), triton.cdiv(n_cols, block_n), _MAX_SPLITS))
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, n_splits), block_n) * block_n
    return triton.cdiv(n_cols, cols_per_split), cols_per_split


def _decode_grid(args, cfg: Config) -> _DecodeGrid:
    B, Hq, T, _ = args.q.shape
    Hkv, S, P = args.k.shape[1], args.k.shape[2], args.prefix_k.shape[2]
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(Hq // Hkv * T)))
    row_blocks = triton.cdiv(Hq // Hkv * T, block_m)
    return _DecodeGrid(block_m, row_blocks, *_split_columns(P + S, B * Hkv * row_blocks, cfg.block_n, args.q.device))


def _launch_decode(args, cfg: Config, grid: _DecodeGrid, out_part: torch.Tensor, lse_part: torch.Tensor) -> None:
    """``_decode_kernel`` into ``out_part`` [splits, B * Hq * T, D] and ``lse_part`` [splits, B * Hq * T]."""
    q, k, prefix_k = args.q, args.k, args.prefix_k
    B, Hq, T, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    ptrs, flags = _common_args(args)
    _decode_kernel[_grid(B * Hkv, grid.n_splits, grid.row_blocks)](
        *ptrs, out_part, lse_part, *_strides(q, k, args.v, prefix_k, args.prefix_v),
        Hq, T, S, P, D, B * Hq * T, grid.cols_per_split, args.scale * 1.4426950408889634, args.seed_value,
        args.dropout_p, GROUP=Hq // Hkv, CAUSAL=args.causal, DROPOUT=args.dropout_p > 0.0, **flags,
        PRECISION=_precision(q), BLOCK_M=grid.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _merge_splits(out_part: torch.Tensor, lse_part: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every split's partial (out, lse) of a row combined: ``(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T])``."""
    B, Hq, T, D = q.shape
    n_splits, n_rows = lse_part.shape
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    block_r = 16
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        out_part, lse_part, out, lse, n_rows, n_splits, D, BLOCK_R=block_r, BLOCK_D=_block_d(D),
    )
    return out, lse


def _parts(n_splits: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows = q.shape[0] * q.shape[1] * q.shape[2]
    return (torch.empty(n_splits, n_rows, q.shape[3], dtype=torch.float32, device=q.device),
            torch.empty(n_splits, n_rows, dtype=torch.float32, device=q.device))


def _forward_decode(args, tiles: TileTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K forward for short queries: same results as :func:`_forward_general`."""
    cfg = _config(args.q, "decode", tiles)
    grid = _decode_grid(args, cfg)
    out_part, lse_part = _parts(grid.n_splits, args.q)
    _launch_decode(args, cfg, grid, out_part, lse_part)
    return _merge_splits(out_part, lse_part, args.q)


def _row_groups(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch rows grouped by bank row, on the device (no host read): ``order`` [B] int32, the rows
    sorted by bank row (stable), and ``starts`` [N + 2] int32, group ``g`` being
    ``order[starts[g]:starts[g + 1]]``; group ``N`` holds the rows without a prefix (index -1)."""
    q, N = args.q, args.prefix_k.shape[0]
    if args.prefix_index is None:  # every row reads bank row 0 (N = 1)
        order = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)
        # [0, B, B] made on the device: a tensor from a Python list would be a blocking host-to-device copy
        starts = torch.arange(3, dtype=torch.int32, device=q.device).clamp_(max=1).mul_(q.shape[0])
        return order, starts
    key = torch.where(args.prefix_index >= 0, args.prefix_index, N)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(N + 2, dtype=sorted_key.dtype, device=q.device)
    return order.to(torch.int32), torch.searchsorted(sorted_key, bounds, out_int32=True)


def _forward_grouped(args, tiles: TileTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K forward for short queries whose rows share bank rows (a cascade): same results as
    :func:`_forward_decode`, without dropout.

    The prefix part stacks the queries of every row that uses a bank row (rows x T x the query heads of
    a KV head) so that each prefix tile is loaded once per group and multiplied against all of them
    (``_grouped_prefix_kernel``); the sequence part is ``_decode_kernel`` with an empty prefix. Both write
    partial results into one buffer, merged by log-sum-exp in one ``_merge_kernel`` launch.
    """
    q, prefix_k = args.q, args.prefix_k
    B, Hq, T, D = q.shape
    N, Hkv, P = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    group = Hq // Hkv
    cfg = _config(q, "decode", tiles)
    empty_k, empty_v = prefix_k[:, :, :0], args.prefix_v[:, :, :0]
    sequence = dataclasses.replace(args, prefix_k=empty_k, prefix_v=empty_v, prefix_index=None, prefix_lens=None)
    sequence_grid = _decode_grid(sequence, cfg)
    # The groups' sizes live on the device: tiles fit the average group (B / N rows), and enough of them
    # to cover the whole batch in one group; a tile past its group's rows exits at once.
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(triton.cdiv(B, N) * group * T)))
    row_tiles = triton.cdiv(B * group * T, block_m)
    busy = Hkv * max(min(N, B), row_tiles)
    prefix_splits, cols_per_split = _split_columns(P, busy, cfg.block_n, q.device)
    out_part, lse_part = _parts(prefix_splits + sequence_grid.n_splits, q)
    order, starts = _row_groups(args)
    lens = q if args.prefix_lens is None else args.prefix_lens  # q stands in for an absent tensor, never read
    _grouped_prefix_kernel[_grid((N + 1) * Hkv, prefix_splits, row_tiles)](
        q, prefix_k, args.prefix_v, lens, order, starts, out_part, lse_part,
        *_strides(q, prefix_k, args.prefix_v), Hq, T, P, D, N, B * Hq * T, cols_per_split,
        args.scale * 1.4426950408889634,
        GROUP=group, HAS_LENS=args.prefix_lens is not None, PRECISION=_precision(q),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(D),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _launch_decode(sequence, cfg, sequence_grid, out_part[prefix_splits:], lse_part[prefix_splits:])
    return _merge_splits(out_part, lse_part, q)


def groups_rows(args) -> bool:
    """Whether :func:`forward` takes the grouped decode path: short queries (T <= 16) without dropout, a
    prefix of at least ``_GROUP_MIN_PREFIX`` keys, and more batch rows than bank rows (so some rows share
    one), at most ``_GROUP_MAX_BANK_ROWS`` of them. Decided from shapes only, so it reads nothing from
    the device."""
    B, _, T, _ = args.q.shape
    N, _, P, _ = args.prefix_k.shape
    return (T <= _DECODE_MAX_T and args.dropout_p == 0.0 and P >= _GROUP_MIN_PREFIX
            and N < B and N <= _GROUP_MAX_BANK_ROWS)


def forward(
    args, tiles: TileTable | None = None, *, group_rows: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend forward on the op's argument record (``fastprompt.attention.AttentionArgs``; read by field
    name): ``(out [B, Hq, T, D], lse [B, Hq, T] float32)``.

    Queries of T <= 16 take a split-K decode path, longer ones the tiled kernel. Among decode calls, those
    whose rows share bank rows read each bank row once per group (:func:`groups_rows`; ``group_rows``
    forces the choice, for tests and benchmarks). ``tiles`` replaces the shipped config of the kernels it
    names (for tuning).
    """
    if args.q.shape[2] > _DECODE_MAX_T:
        return _forward_general(args, tiles)
    if group_rows is None:
        group_rows = groups_rows(args)
    if group_rows and args.dropout_p > 0.0:
        raise ValueError("the grouped decode path has no dropout; call it with dropout_p = 0")
    return (_forward_grouped if group_rows else _forward_decode)(args, tiles)


def backward(
    args, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None,
    tiles: TileTable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend backward: ``(dq, dk, dv, dprefix_k, dprefix_v)`` in the shapes and dtypes of the inputs.

    ``grad_lse`` [B, Hq, T]: a gradient reaching the lse; it adds ``grad_lse_i * P_ij`` to ``dS_ij``, which
    is lowering ``delta_i`` by ``grad_lse_i``.

    grad_out, out [B, Hq, T, D] (any strides); lse [B, Hq, T] float32 from :func:`forward`. dprefix_k,
    dprefix_v [N, Hkv, P, D] are summed over the rows using each bank row, zero past ``prefix_lens``
    and for unused bank rows.
    """
    q, k, v, prefix_k, prefix_v = args.q, args.k, args.v, args.prefix_k, args.prefix_v
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    N, P = prefix_k.shape[0], prefix_k.shape[2]
    group = Hq // Hkv
    assert grad_out.dtype == q.dtype and out.dtype == q.dtype and lse.dtype == torch.float32
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kpm), flags = _common_args(args)
    device = q.device
    lse = lse.contiguous()
    block_d = _block_d(D)
    precision = _precision(q)
    dropout = args.dropout_p > 0.0
    scale, seed, dropout_p = args.scale, args.seed_value, args.dropout_p
    qk_scale = scale * 1.4426950408889634

    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=device)
    block_t = 16
    _bwd_delta_kernel[_grid(B * Hq, triton.cdiv(T, block_t))](
        out, grad_out, delta, *_strides(out, grad_out), Hq, T, D, BLOCK_M=block_t, BLOCK_D=block_d,
    )
    if grad_lse is not None:
        delta -= grad_lse.float()

    dq = torch.empty(B, Hq, T, D, dtype=q.dtype, device=device)
    cfg = _config(q, "dq", tiles)
    _bwd_dq_kernel[_grid(B * Hq, triton.cdiv(T, cfg.block_m))](
        q, k, v, prefix_k, prefix_v, grad_out, lse, delta, prefix_index, prefix_lens, kpm, dq,
        *_strides(q, k, v, prefix_k, prefix_v, grad_out),
        Hq, T, S, P, D, scale, qk_scale, seed, dropout_p,
        GROUP=group, CAUSAL=args.causal, DROPOUT=dropout, **flags,
        PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    dk = torch.empty(B, Hkv, S, D, dtype=k.dtype, device=device)
    dv = torch.empty(B, Hkv, S, D, dtype=v.dtype, device=device)
    cfg = _config(q, "dkdv", tiles)
    _bwd_dkdv_kernel[_grid(B * Hkv, triton.cdiv(S, cfg.block_n))](
        q, k, v, grad_out, lse, delta, kpm, dk, dv, *_strides(q, k, v, grad_out),
        Hq, T, S, P, D, scale, qk_scale, seed, dropout_p,
        GROUP=group, CAUSAL=args.causal, HAS_KPM=flags["HAS_KPM"], DROPOUT=dropout,
        PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    if P == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    p_blocks = triton.cdiv(P, cfg.block_n)
    n_splits = max(1, min(triton.cdiv(_target_programs(device), p_blocks * N * Hkv), B))
    dpk_part = torch.empty(n_splits, N, Hkv, P, D, dtype=torch.float32, device=device)
    dpv_part = torch.empty(n_splits, N, Hkv, P, D, dtype=torch.float32, device=device)
    _bwd_dprefix_kernel[_grid(N * Hkv, p_blocks, n_splits)](
        q, prefix_k, prefix_v, grad_out, lse, delta, prefix_index, prefix_lens, dpk_part, dpv_part,
        *_strides(q, prefix_k, prefix_v, grad_out),
        B, Hq, T, P, D, N, n_splits, scale, qk_scale, seed, dropout_p,
        GROUP=group, HAS_INDEX=flags["HAS_INDEX"], HAS_LENS=flags["HAS_LENS"], DROPOUT=dropout,
        PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv, dpk_part.sum(0).to(prefix_k.dtype), dpv_part.sum(0).to(prefix_v.dtype)
