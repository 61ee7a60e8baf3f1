"""The ``torch`` encoder backend: the prompt encoders in plain PyTorch, for tensors on any device.

One call per layer for all tokens; the LSTM does its input projections for all steps in one GEMM and runs
both directions in the same step loop, with a hand-written backward through time (no autograd graph of
per-step ops). Implements the backend contract of :mod:`fastprompt.encoders.backends`.
"""

from __future__ import annotations

import torch

from fastprompt.encoders.backends import compute_dtype

__all__ = ["lstm_backward", "lstm_forward", "mlp_backward", "mlp_forward"]


def _rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return (x if idx is None else x.index_select(0, idx)).to(compute_dtype(x))


def mlp_forward(
    x: torch.Tensor, idx: torch.Tensor | None, weights: list[torch.Tensor], biases: list[torch.Tensor], act: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(out [P, O], hiddens)``: the output and each hidden layer's activation [P, H_i], kept for backward."""
    h = _rows(x, idx)
    hiddens = []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.addmm(b.to(h.dtype), h, w.to(h.dtype).t())
        if i < len(weights) - 1:
            h = torch.tanh_(h) if act == "tanh" else torch.relu_(h)
            hiddens.append(h)
    return h, hiddens


def mlp_backward(
    grad: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None, weights: list[torch.Tensor],
    hiddens: list[torch.Tensor], act: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(d rows [P, D], dweights, dbiases)`` from ``grad`` [P, O]; the parameter gradients in their dtypes."""
    inputs = [_rows(x, idx), *hiddens]
    dws, dbs = [None] * len(weights), [None] * len(weights)
    g = grad
    for i in reversed(range(len(weights))):
        dws[i] = (g.t() @ inputs[i]).to(weights[i].dtype)
        dbs[i] = g.sum(0).to(weights[i].dtype)
        g = g @ weights[i].to(g.dtype)
        if i > 0:
            h = hiddens[i - 1]
            g = g * (1.0 - h * h) if act == "tanh" else g * (h > 0)
    return g, dws, dbs


def lstm_forward(
    x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bidirectional layer: ``(y [P, 2H], c [2, P, H], gates [2, P, 4H])``, state in step order."""
    # Saved state is kept in *step* order: step s of the reverse direction is time P - 1 - s, so both
    # directions read and write the same step slot and the loop body serves both.
    xs = _rows(x, idx)
    P, H = xs.shape[0], params[1].shape[1]
    dtype = xs.dtype
    w_hh = [params[1].to(dtype), params[5].to(dtype)]
    gates = torch.empty(2, P, 4 * H, dtype=dtype, device=xs.device)
    for d in range(2):
        w_ih, _, b_ih, b_hh = params[4 * d : 4 * d + 4]
        torch.addmm(b_ih.to(dtype) + b_hh.to(dtype), xs if d == 0 else xs.flip(0), w_ih.to(dtype).t(), out=gates[d])
    c = torch.empty(2, P, H, dtype=dtype, device=xs.device)
    h = torch.empty(2, P, H, dtype=dtype, device=xs.device)
    for s in range(P):
        if s > 0:
            for d in range(2):
                gates[d, s].addmv_(w_hh[d], h[d, s - 1])
        step = gates[:, s].view(2, 4, H)
        cell_in = torch.tanh(step[:, 2])
        step.sigmoid_()
        step[:, 2] = cell_in
        torch.mul(step[:, 0], cell_in, out=c[:, s])
        if s > 0:
            c[:, s].addcmul_(step[:, 1], c[:, s - 1])
        torch.mul(step[:, 3], torch.tanh(c[:, s]), out=h[:, s])
    y = torch.cat([h[0], h[1].flip(0)], dim=1)
    return y, c, gates


def lstm_backward(
    dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor], y: torch.Tensor,
    c: torch.Tensor, gates: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(d rows [P, D], one gradient per parameter)`` from ``dy`` [P, 2H] and the forward's saved state."""
    xs = _rows(x, idx)
    P, H = xs.shape[0], params[1].shape[1]
    h = torch.stack([y[:, :H], y[:, H:].flip(0)])  # step order, as the forward kept it
    w_hh = [params[1].to(xs.dtype), params[5].to(xs.dtype)]
    dy_steps = torch.stack([dy[:, :H], dy[:, H:].flip(0)])
    dgates = torch.empty_like(gates)
    dh = torch.zeros(2, H, dtype=xs.dtype, device=xs.device)
    dc = torch.zeros(2, H, dtype=xs.dtype, device=xs.device)
    for s in reversed(range(P)):
        step = gates[:, s].view(2, 4, H)
        gate_i, gate_f, gate_g, gate_o = step.unbind(1)
        dh += dy_steps[:, s]
        tanh_c = torch.tanh(c[:, s])
        dc.addcmul_(dh * gate_o, 1.0 - tanh_c * tanh_c)
        dstep = dgates[:, s].view(2, 4, H)
        torch.mul(dc * gate_g, gate_i * (1.0 - gate_i), out=dstep[:, 0])
        if s > 0:
            torch.mul(dc * c[:, s - 1], gate_f * (1.0 - gate_f), out=dstep[:, 1])
        else:
            dstep[:, 1].zero_()
        torch.mul(dc * gate_i, 1.0 - gate_g * gate_g, out=dstep[:, 2])
        torch.mul(dh * tanh_c, gate_o * (1.0 - gate_o), out=dstep[:, 3])
        dc.mul_(gate_f)
        for d in range(2):
            torch.mv(w_hh[d].t(), dgates[d, s], out=dh[d])
    dx = torch.zeros_like(xs)
    grads = []
    for d in range(2):
        w_ih, w_hh_d, b_ih, _ = params[4 * d : 4 * d + 4]
        dg_time = dgates[d] if d == 0 else dgates[d].flip(0)
        db = dgates[d].sum(0).to(b_ih.dtype)
        grads += [
            (dg_time.t() @ xs).to(w_ih.dtype),
            (dgates[d, 1:].t() @ h[d, :-1]).to(w_hh_d.dtype),
            db,
            db.clone(),
        ]
        dx.addmm_(dg_time, w_ih.to(xs.dtype))
    return dx, grads
