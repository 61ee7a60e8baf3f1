"""Triton kernels for the prompt encoders of Prefix-Tuning and P-tuning, with plain launchers.

Two kernels carry everything:

* ``_linear_kernel``: ``C = epilogue(A @ B)`` for 2-D operands of any strides. The epilogue adds one or
  two bias vectors, applies tanh/ReLU, multiplies by the activation's derivative read from a stored
  activation (the backward of ``act(x W^T + b)``), and can accumulate into ``C``. It can gather the rows
  of ``A`` through an index vector (the embedding lookup fused into the first layer) and can emit the row
  sums of ``A`` (a bias gradient, fused into the weight-gradient GEMM). Every MLP layer, forward and
  backward, and every LSTM input/weight GEMM is one launch of it; hidden pre-activations never reach
  memory, only the post-activations the backward needs.
* ``_lstm_fwd_kernel`` / ``_lstm_bwd_kernel``: the recurrence of one bidirectional LSTM layer. Program
  ``(d, p)`` of a ``(2, n_progs)`` grid runs direction ``d`` (0 forward in time, 1 backward) for the
  time steps ``[S_BEGIN, S_END)`` and owns the hidden-unit tiles ``p, p + n_progs, ...``. A step needs
  the previous step's ``h`` of ALL units (the mat-vec with ``W_hh``), and Triton has no grid-wide
  barrier (a spin barrier deadlocks under the interpreter, which runs programs one after another, and
  on a GPU whenever not all programs are resident), so the launchers order steps in one of two ways:

  - mode A, ``n_progs = 1``: one launch runs all steps; each program is a persistent loop over steps
    and tiles, and ``tl.debug_barrier()`` makes a step's stores visible to the next step. Best while
    ``W_hh`` is small enough that one SM per direction streams it quickly (and always on CPU).
  - mode B, ``n_progs`` = number of tiles: one launch per step, so the kernel boundary orders the steps
    and every step's mat-vec is spread over many SMs instead of streaming all of ``W_hh`` through one.

  ``h`` and ``c`` of the previous step are exchanged through global memory (they are outputs saved for
  the backward anyway). The backward's mat-vec ``dh_{t'} = W_hh^T dgates_t`` needs the gate gradients of
  all units, so it runs at the START of the next step, each tile reducing over all 4H gate rows for its
  own units; then both modes run the same code. The input projections ``x @ W_ih^T + b_ih + b_hh`` of
  all steps are one GEMM before the recurrence, and the weight gradients are GEMMs over all steps after
  it, so the sequential part only does the mat-vec with ``W_hh`` plus the gate math.

Launchers take and return torch tensors; intermediates are float32. Kernels know nothing of PEFT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_CODES = {"none": 0, "tanh": 1, "relu": 2}


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1) saturates cleanly to +-1 at both ends (exp overflow gives 1, underflow -1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounded to nearest even on every target. A GPU's float32 -> bfloat16 conversion rounds
    to nearest; the interpreter's truncates (drops the low 16 bits), so its errors all point towards zero and
    add up along a sum instead of cancelling, enough to move a ReLU pre-activation near zero to its other
    side. bfloat16 is therefore rounded here in integer arithmetic and taken as the high half of float32's
    bits, which leaves no conversion to the interpreter (whose conversion also mangles subnormals)."""
    if dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        # a NaN is not rounded (its payload could carry into the sign bit) but quieted, so that its high half
        # is a NaN even when the payload lies only in the low half
        bits = tl.where(x == x, bits + 0x7FFF + ((bits >> 16) & 1), bits | 0x400000)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _linear_kernel(
    a_ptr, idx_ptr, b_ptr, bias_ptr, bias2_ptr, g_ptr, c_ptr, rowsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_gm, stride_gn, stride_cm, stride_cn,
    HAS_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
    ACT: tl.constexpr, DACT: tl.constexpr, ACCUMULATE: tl.constexpr, ROWSUM: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = tl.load(idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64) if HAS_IDX else offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :], other=0.0,
        )
        if ROWSUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        a = _round_to(a, COMPUTE_DTYPE).to(DOT_DTYPE)
        b = _round_to(b, COMPUTE_DTYPE).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS2:
        acc += tl.load(bias2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = _tanh(acc)
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    mask_c = mask_m[:, None] & mask_n[None, :]
    if DACT != 0:
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask_c, other=0.0)
        g = g.to(tl.float32)
        acc = acc * (1.0 - g * g) if DACT == 1 else tl.where(g > 0.0, acc, 0.0)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(c_ptrs, _round_to(acc, c_ptr.dtype.element_ty), mask=mask_c)
    if ROWSUM and pid_n == 0:
        tl.store(rowsum_ptr + offs_m, _round_to(row_sum, rowsum_ptr.dtype.element_ty), mask=mask_m)


# the step range changes every launch in mode B: one compiled kernel for all of them
@triton.jit(do_not_specialize=["S_BEGIN", "S_END"])
def _lstm_fwd_kernel(
    gx_ptr, w_fwd_ptr, w_rev_ptr, y_ptr, c_ptr, gates_ptr,
    P, H, S_BEGIN, S_END,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Steps [S_BEGIN, S_END) of both directions. gx [2, P, 4H] input projections (+ both biases); y [P, 2H];
    c [2, P, H]; gates [2, P, 4H] (i, f, g, o). Program (d, p) owns unit tiles p, p + n_progs, ..."""
    d = tl.program_id(0)
    p = tl.program_id(1)
    n_progs = tl.num_programs(1)
    w_ptr = w_fwd_ptr if d == 0 else w_rev_ptr
    gx_ptr += d * P * 4 * H
    gates_ptr += d * P * 4 * H
    c_ptr += d * P * H
    y_ptr += d * H
    for s in range(S_BEGIN, S_END):
        t = s + d * (P - 1 - 2 * s)
        t_prev = t - 1 + 2 * d
        for j0 in range(p * BLOCK_H, H, n_progs * BLOCK_H):
            offs_j = j0 + tl.arange(0, BLOCK_H)
            mask_j = offs_j < H
            row = gx_ptr + t * 4 * H + offs_j
            pre_i = tl.load(row, mask=mask_j, other=0.0)
            pre_f = tl.load(row + H, mask=mask_j, other=0.0)
            pre_g = tl.load(row + 2 * H, mask=mask_j, other=0.0)
            pre_o = tl.load(row + 3 * H, mask=mask_j, other=0.0)
            c_prev = tl.zeros((BLOCK_H,), dtype=tl.float32)
            if s > 0:
                # the recurrent mat-vec over all H units of h_{t_prev}: batch is 1, so broadcast-multiply +
                # reduce instead of tl.dot; BLOCK_K runs along the contiguous rows of W_hh
                acc_i = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
                acc_f = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
                acc_g = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
                acc_o = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = offs_k < H
                    h = tl.load(y_ptr + t_prev * 2 * H + offs_k, mask=mask_k, other=0.0)[None, :]
                    w = w_ptr + offs_j[:, None] * H + offs_k[None, :]
                    mask_w = mask_j[:, None] & mask_k[None, :]
                    acc_i += tl.load(w, mask=mask_w, other=0.0).to(tl.float32) * h
                    acc_f += tl.load(w + H * H, mask=mask_w, other=0.0).to(tl.float32) * h
                    acc_g += tl.load(w + 2 * H * H, mask=mask_w, other=0.0).to(tl.float32) * h
                    acc_o += tl.load(w + 3 * H * H, mask=mask_w, other=0.0).to(tl.float32) * h
                pre_i += tl.sum(acc_i, axis=1)
                pre_f += tl.sum(acc_f, axis=1)
                pre_g += tl.sum(acc_g, axis=1)
                pre_o += tl.sum(acc_o, axis=1)
                c_prev = tl.load(c_ptr + t_prev * H + offs_j, mask=mask_j, other=0.0)
            gate_i = _sigmoid(pre_i)
            gate_f = _sigmoid(pre_f)
            gate_g = _tanh(pre_g)
            gate_o = _sigmoid(pre_o)
            c = gate_f * c_prev + gate_i * gate_g
            tl.store(c_ptr + t * H + offs_j, c, mask=mask_j)
            tl.store(y_ptr + t * 2 * H + offs_j, gate_o * _tanh(c), mask=mask_j)
            out = gates_ptr + t * 4 * H + offs_j
            tl.store(out, gate_i, mask=mask_j)
            tl.store(out + H, gate_f, mask=mask_j)
            tl.store(out + 2 * H, gate_g, mask=mask_j)
            tl.store(out + 3 * H, gate_o, mask=mask_j)
        # mode A: h_t and c_t of every tile must be visible before any tile of step s + 1 reads them
        tl.debug_barrier()


# as the forward: one compiled kernel for every step range
@triton.jit(do_not_specialize=["S_BEGIN", "S_END"])
def _lstm_bwd_kernel(
    dy_ptr, w_fwd_ptr, w_rev_ptr, c_ptr, gates_ptr, dgates_ptr, dc_ptr,
    P, H, S_BEGIN, S_END,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Steps [S_BEGIN, S_END) of backpropagation through time for both directions. dy [P, 2H]; c, gates as
    saved by the forward; dgates [2, P, 4H] receives the gate pre-activation gradients; dc [2, H]
    zero-initialised carry of the cell gradient. Program (d, p) owns unit tiles p, p + n_progs, ..."""
    d = tl.program_id(0)
    p = tl.program_id(1)
    n_progs = tl.num_programs(1)
    w_ptr = w_fwd_ptr if d == 0 else w_rev_ptr
    gates_ptr += d * P * 4 * H
    dgates_ptr += d * P * 4 * H
    c_ptr += d * P * H
    dy_ptr += d * H
    dc_ptr += d * H
    for s in range(S_BEGIN, S_END):
        # walk the direction's own time order backwards: t_prev precedes t in the forward pass,
        # t_next was processed by the step before this one
        t = P - 1 - s - d * (P - 1 - 2 * s)
        t_prev = t - 1 + 2 * d
        t_next = t + 1 - 2 * d
        for j0 in range(p * BLOCK_H, H, n_progs * BLOCK_H):
            offs_j = j0 + tl.arange(0, BLOCK_H)
            mask_j = offs_j < H
            dh = tl.load(dy_ptr + t * 2 * H + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            if s > 0:
                # dh_t += W_hh[:, tile]^T @ dgates_{t_next}, reduced over all 4H gate rows: the previous step
                # (or launch) finished dgates_{t_next} of every unit. The tile's columns are the contiguous
                # axis of W_hh, so they are the inner, vectorised one.
                acc = tl.zeros((BLOCK_K, BLOCK_H), dtype=tl.float32)
                for r0 in range(0, 4 * H, BLOCK_K):
                    offs_r = r0 + tl.arange(0, BLOCK_K)
                    mask_r = offs_r < 4 * H
                    dg = tl.load(dgates_ptr + t_next * 4 * H + offs_r, mask=mask_r, other=0.0)
                    w = tl.load(
                        w_ptr + offs_r[:, None] * H + offs_j[None, :],
                        mask=mask_r[:, None] & mask_j[None, :], other=0.0,
                    )
                    acc += w.to(tl.float32) * dg[:, None]
                dh += tl.sum(acc, axis=0)
            row = gates_ptr + t * 4 * H + offs_j
            gate_i = tl.load(row, mask=mask_j, other=0.0)
            gate_f = tl.load(row + H, mask=mask_j, other=0.0)
            gate_g = tl.load(row + 2 * H, mask=mask_j, other=0.0)
            gate_o = tl.load(row + 3 * H, mask=mask_j, other=0.0)
            c = tl.load(c_ptr + t * H + offs_j, mask=mask_j, other=0.0)
            c_prev = tl.zeros((BLOCK_H,), dtype=tl.float32)
            if s < P - 1:
                c_prev = tl.load(c_ptr + t_prev * H + offs_j, mask=mask_j, other=0.0)
            tanh_c = _tanh(c)
            dc = dh * gate_o * (1.0 - tanh_c * tanh_c) + tl.load(dc_ptr + offs_j, mask=mask_j, other=0.0)
            out = dgates_ptr + t * 4 * H + offs_j
            tl.store(out, dc * gate_g * gate_i * (1.0 - gate_i), mask=mask_j)
            tl.store(out + H, dc * c_prev * gate_f * (1.0 - gate_f), mask=mask_j)
            tl.store(out + 2 * H, dc * gate_i * (1.0 - gate_g * gate_g), mask=mask_j)
            tl.store(out + 3 * H, dh * tanh_c * gate_o * (1.0 - gate_o), mask=mask_j)
            # each unit belongs to one program, so its cell-gradient carry needs no synchronisation
            tl.store(dc_ptr + offs_j, dc * gate_f, mask=mask_j)
        # mode A: dgates_t of every tile must be visible before any tile of step s + 1 reduces over them
        tl.debug_barrier()


def _compute_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def linear(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
    act: str = "none",
    dact_from: torch.Tensor | None = None,
    dact: str = "none",
    accumulate: bool = False,
    rowsum_out: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out[M, N] (+)= epilogue(A[rows] @ B)``; A [*, K] (rows = ``idx`` [M] or all), B [K, N], any strides.

    Epilogue order: + bias [N] + bias2 [N], ``act``, times ``dact``'(``dact_from`` [M, N]), (+ out).
    ``rowsum_out`` [M] receives the row sums of A over K. Products run in ``compute_dtype`` (IEEE fp32
    for float32, never TF32: PEFT's fp32 modules are matched tightly), accumulation in float32.
    """
    M, N = out.shape
    K = b.shape[0]
    if M == 0 or N == 0:
        return out
    grid = (triton.cdiv(M, 32), triton.cdiv(N, 64))
    dummy = out
    interpreted = out.device.type == "cpu"  # CPU tensors reach the kernels only under the interpreter
    _linear_kernel[grid](
        a, idx if idx is not None else dummy, b,
        bias if bias is not None else dummy, bias2 if bias2 is not None else dummy,
        dact_from if dact_from is not None else dummy, out,
        rowsum_out if rowsum_out is not None else dummy,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        dact_from.stride(0) if dact_from is not None else 0,
        dact_from.stride(1) if dact_from is not None else 0,
        out.stride(0), out.stride(1),
        HAS_IDX=idx is not None, HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
        ACT=ACT_CODES[act], DACT=ACT_CODES[dact], ACCUMULATE=accumulate, ROWSUM=rowsum_out is not None,
        COMPUTE_DTYPE=_compute_dtype(compute_dtype),
        # the interpreter's 16-bit dot is wrong (numpy has no bfloat16): round operands to the compute
        # dtype, then multiply in fp32, which is exact for 16-bit products and accumulates in fp32 as the
        # GPU's tensor cores do
        DOT_DTYPE=tl.float32 if interpreted else _compute_dtype(compute_dtype),
        INPUT_PRECISION="ieee" if compute_dtype == torch.float32 or interpreted else None,
        BLOCK_M=32, BLOCK_N=64, BLOCK_K=32,
    )
    return out


def mlp_forward(
    x: torch.Tensor, idx: torch.Tensor | None, weights: list[torch.Tensor], biases: list[torch.Tensor], act: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``act(...act(x[idx] W1^T + b1)...) Wn^T + bn``: x [*, D] (rows picked by idx [P]) -> out [P, O] fp32.

    Returns (out, hidden post-activations [P, H_i] fp32, kept for the backward).
    """
    rows = idx.shape[0] if idx is not None else x.shape[0]
    cdtype = weights[0].dtype
    hiddens = []
    h, h_idx = x, idx
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        last = i == len(weights) - 1
        out = torch.empty(rows, w.shape[0], device=x.device, dtype=torch.float32)
        linear(h, w.t(), out, idx=h_idx, bias=b, act="none" if last else act, compute_dtype=cdtype)
        if not last:
            hiddens.append(out)
        h, h_idx = out, None
    return h, hiddens


def mlp_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor | None,
    weights: list[torch.Tensor],
    hiddens: list[torch.Tensor],
    act: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of :func:`mlp_forward`: (d x[idx] [P, D] fp32, dW_i like W_i, db_i like b_i)."""
    cdtype = weights[0].dtype
    inputs = [(x, idx)] + [(h, None) for h in hiddens]
    dws: list[torch.Tensor] = [None] * len(weights)
    dbs: list[torch.Tensor] = [None] * len(weights)
    g = grad
    for i in reversed(range(len(weights))):
        w = weights[i]
        a, a_idx = inputs[i]
        a_rows = a if a_idx is None else a.index_select(0, a_idx)
        dws[i] = torch.empty_like(w)
        dbs[i] = torch.empty(w.shape[0], device=w.device, dtype=w.dtype)
        # dW = g^T @ a, with db = row sums of g^T fused into the same pass over g
        linear(g.t(), a_rows, dws[i], rowsum_out=dbs[i], compute_dtype=cdtype)
        dg = torch.empty(g.shape[0], w.shape[1], device=g.device, dtype=torch.float32)
        if i > 0:
            linear(g, w, dg, dact_from=hiddens[i - 1], dact=act, compute_dtype=cdtype)
        else:
            linear(g, w, dg, compute_dtype=cdtype)
        g = dg
    return g, dws, dbs


# Mode B (one launch per step, the mat-vec spread over the SMs) from this hidden size on: one direction's
# W_hh is then 4H x H x 4 B = 1 MiB in fp32, which one SM streams from L2 (~100 GB/s) in ~10 us per step,
# already above the ~5 us a kernel launch per step costs; at H = 128 (256 KiB, ~2.5 us) mode A's single
# launch wins. bf16 halves the bytes, which moves the break-even only to H ~ 360.
_LSTM_WIDE_MIN_H = 256
# Mode B tiles: 16 units per program gives 128 programs per direction at H = 2048 (about two per H100 SM
# for both directions), each streaming 4 x 16 rows of W_hh per step. The forward's reduction chunk of 128
# lets one warp read 512 contiguous bytes of a W_hh row; the backward reads W_hh[:, tile] as 64-byte row
# pieces (16 fp32, whole 32-byte sectors) and reduces 256 gate rows per chunk to keep as many bytes in flight.
_LSTM_WIDE_BLOCK_H = 16
_LSTM_WIDE_BLOCK_K_FWD = 128
_LSTM_WIDE_BLOCK_K_BWD = 256


def _lstm_programs(H: int, block_h: int, device: torch.device) -> int:
    """Programs per direction for the recurrence: 1 is mode A (all steps in one launch), more is mode B
    (one launch per step, hidden units split into tiles of ``block_h``). The interpreter runs programs one
    by one, so on CPU mode A is the only sensible one; tests force mode B by patching this function. Any
    other device counts as a GPU (``meta`` tensors stand for one when kernels are compiled without it)."""
    if device.type == "cpu" or H < _LSTM_WIDE_MIN_H:
        return 1
    return triton.cdiv(H, block_h)


def _lstm_recurrence(kernel, args: tuple, P: int, H: int, device: torch.device, wide_block_k: int) -> None:
    """Runs ``kernel`` over all P steps of both directions in mode A, or in mode B with ``wide_block_k``."""
    n_progs = _lstm_programs(H, _LSTM_WIDE_BLOCK_H, device)
    if n_progs == 1:
        block = max(16, min(64, triton.next_power_of_2(H)))
        # one program per direction streams all of W_hh: 8 warps keep more loads in flight from its SM, and
        # the forward's four 64 x 64 fp32 accumulators then fit in registers (4 warps spill them)
        kernel[(2, 1)](*args, P, H, 0, P, BLOCK_H=block, BLOCK_K=block, num_warps=8)
        return
    for s in range(P):
        kernel[(2, n_progs)](*args, P, H, s, s + 1, BLOCK_H=_LSTM_WIDE_BLOCK_H, BLOCK_K=wide_block_k, num_warps=4)


def lstm_forward(
    x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bidirectional LSTM layer. x [*, D] (rows idx [P]); params = (w_ih [4H, D], w_hh [4H, H], b_ih [4H],
    b_hh [4H]) for the forward then the reverse direction. Returns y [P, 2H] fp32 ([forward, reverse]
    halves, as torch.nn.LSTM), c [2, P, H] and gates [2, P, 4H] (post-activation i, f, g, o), fp32.
    """
    rows = idx.shape[0] if idx is not None else x.shape[0]
    H = params[1].shape[1]
    cdtype = params[0].dtype
    gates = torch.empty(2, rows, 4 * H, device=x.device, dtype=torch.float32)
    for d in range(2):
        w_ih, _, b_ih, b_hh = params[4 * d : 4 * d + 4]
        linear(x, w_ih.t(), gates[d], idx=idx, bias=b_ih, bias2=b_hh, compute_dtype=cdtype)
    y = torch.empty(rows, 2 * H, device=x.device, dtype=torch.float32)
    c = torch.empty(2, rows, H, device=x.device, dtype=torch.float32)
    args = (gates, params[1].contiguous(), params[5].contiguous(), y, c, gates)
    _lstm_recurrence(_lstm_fwd_kernel, args, rows, H, x.device, _LSTM_WIDE_BLOCK_K_FWD)
    return y, c, gates


def lstm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor | None,
    params: list[torch.Tensor],
    y: torch.Tensor,
    c: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gradients of :func:`lstm_forward`: (d x[idx] [P, D] fp32, grads of the 8 params, each like its param)."""
    P = y.shape[0]
    H = params[1].shape[1]
    cdtype = params[0].dtype
    w_fwd, w_rev = params[1].contiguous(), params[5].contiguous()
    dgates = torch.empty_like(gates)
    dc = torch.zeros(2, H, device=y.device, dtype=torch.float32)
    args = (dy.contiguous(), w_fwd, w_rev, c, gates, dgates, dc)
    _lstm_recurrence(_lstm_bwd_kernel, args, P, H, y.device, _LSTM_WIDE_BLOCK_K_BWD)
    x_rows = x if idx is None else x.index_select(0, idx)
    dx = torch.empty(P, x_rows.shape[1], device=y.device, dtype=torch.float32)
    grads: list[torch.Tensor] = []
    for d in range(2):
        w_ih, w_hh, b_ih, _ = params[4 * d : 4 * d + 4]
        dw_ih, dw_hh = torch.empty_like(w_ih), torch.zeros_like(w_hh)
        db = torch.empty(4 * H, device=y.device, dtype=b_ih.dtype)
        linear(dgates[d].t(), x_rows, dw_ih, rowsum_out=db, compute_dtype=cdtype)
        # h_{t_prev} pairs with dgates_t: the forward direction's previous step is t-1, the reverse one's t+1
        if d == 0:
            linear(dgates[0, 1:].t(), y[:-1, :H], dw_hh, compute_dtype=cdtype)
        else:
            linear(dgates[1, :-1].t(), y[1:, H:], dw_hh, compute_dtype=cdtype)
        linear(dgates[d], w_ih, dx, accumulate=d == 1, compute_dtype=cdtype)
        grads += [dw_ih, dw_hh, db, db.clone()]
    return dx, grads
