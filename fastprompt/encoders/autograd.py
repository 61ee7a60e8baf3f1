"""Autograd of the encoders: an ``autograd.Function`` for the MLP, ``torch.library`` custom ops for the LSTM.

Both run the backend that :func:`~fastprompt.encoders.backends.resolve_encoder_backend` chose for the forward,
and the same one for the backward. The input gradient of a fused lookup (``idx`` given) is scattered back
into the table here, once for every backend.
"""

from __future__ import annotations

import torch

from fastprompt.encoders.backends import compute_dtype, load_encoder_backend

__all__ = ["lstm_layer", "mlp"]


def _input_grad(x: torch.Tensor, idx: torch.Tensor | None, dx_rows: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return dx_rows.to(x.dtype)
    return torch.zeros(x.shape, dtype=dx_rows.dtype, device=x.device).index_add_(0, idx, dx_rows).to(x.dtype)


class _MLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, act, backend, *params):
        weights, biases = list(params[0::2]), list(params[1::2])
        out, hiddens = backend.mlp_forward(x, idx, weights, biases, act)
        ctx.save_for_backward(x, idx, *params, *hiddens)
        ctx.act, ctx.backend, ctx.n_params = act, backend, len(params)
        return out.to(weights[0].dtype)

    @staticmethod
    def backward(ctx, grad):
        x, idx, *rest = ctx.saved_tensors
        params, hiddens = rest[: ctx.n_params], rest[ctx.n_params :]
        dx_rows, dws, dbs = ctx.backend.mlp_backward(
            grad.to(compute_dtype(x)).contiguous(), x, idx, list(params[0::2]), list(hiddens), ctx.act
        )
        dparams = [g for pair in zip(dws, dbs, strict=True) for g in pair]
        return _input_grad(x, idx, dx_rows), None, None, None, *dparams


# The LSTM layer is a custom op (opaque to torch.compile, shapes from the fake): its PyTorch path writes
# through ``out=`` into strided slices step by step, which Dynamo cannot trace inside an autograd.Function.
@torch.library.custom_op("fastprompt::lstm_layer_fwd", mutates_args=())
def _lstm_layer_fwd(
    x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor], backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bidirectional layer: y [P, 2H], c [2, P, H] and gates [2, P, 4H], float32 (float64 for float64)."""
    y, c, gates = load_encoder_backend(backend).lstm_forward(x, idx, params)
    return y.contiguous(), c.contiguous(), gates.contiguous()


@_lstm_layer_fwd.register_fake
def _(x, idx, params, backend):
    rows, hidden = (x.shape[0] if idx is None else idx.shape[0]), params[1].shape[1]
    dtype = compute_dtype(x)
    return (x.new_empty(rows, 2 * hidden, dtype=dtype), x.new_empty(2, rows, hidden, dtype=dtype),
            x.new_empty(2, rows, 4 * hidden, dtype=dtype))


@torch.library.custom_op("fastprompt::lstm_layer_bwd", mutates_args=())
def _lstm_layer_bwd(
    dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor], y: torch.Tensor,
    c: torch.Tensor, gates: torch.Tensor, backend: str,
) -> list[torch.Tensor]:
    """Gradients of :func:`_lstm_layer_fwd`: d x[idx] [P, D] in its compute dtype, then one per parameter, like it."""
    dx_rows, dparams = load_encoder_backend(backend).lstm_backward(dy, x, idx, params, y, c, gates)
    return [dx_rows.contiguous(), *(g.contiguous() for g in dparams)]


@_lstm_layer_bwd.register_fake
def _(dy, x, idx, params, y, c, gates, backend):
    return [x.new_empty(y.shape[0], x.shape[1], dtype=y.dtype), *(p.new_empty(p.shape) for p in params)]


def _lstm_setup_context(ctx, inputs, output) -> None:
    x, idx, params, backend = inputs
    ctx.save_for_backward(x, idx, *params, *output)
    ctx.backend = backend


def _lstm_layer_backward(ctx, dy, _dc, _dgates):
    x, idx, *rest = ctx.saved_tensors
    params, (y, c, gates) = rest[:8], rest[8:]
    dx_rows, *dparams = _lstm_layer_bwd(dy.to(y.dtype).contiguous(), x, idx, params, y, c, gates, ctx.backend)
    return _input_grad(x, idx, dx_rows), None, dparams, None


_lstm_layer_fwd.register_autograd(_lstm_layer_backward, setup_context=_lstm_setup_context)


def mlp(
    x: torch.Tensor, idx: torch.Tensor | None, act: str, backend: str, weights: list[torch.Tensor],
    biases: list[torch.Tensor],
) -> torch.Tensor:
    """The MLP on checked arguments: [P, O] in the weights' dtype, differentiable w.r.t. x and the parameters."""
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return _MLPFunction.apply(x, idx, act, load_encoder_backend(backend), *params)


def lstm_layer(x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor], backend: str) -> torch.Tensor:
    """One bidirectional LSTM layer on checked arguments: y [P, 2H] in the parameters' dtype."""
    return _lstm_layer_fwd(x, idx, params, backend)[0].to(params[0].dtype)
