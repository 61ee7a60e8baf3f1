"""Fused prompt encoders: PEFT's reparameterisation networks run once per forward, with autograd and caching.

Public functions → autograd (an ``autograd.Function`` for the MLP, a ``torch.library`` custom op with a fake
for the LSTM layer) → backend (``fastprompt.kernels.prompt_encoders`` for triton, the ``_torch_*`` functions
below for CPU). Both backends implement the same four functions::

    mlp_forward(x, idx, weights, biases, act) -> (out, hiddens)
    mlp_backward(grad, x, idx, weights, hiddens, act) -> (dx_rows, dweights, dbiases)
    lstm_forward(x, idx, params) -> (y, c, gates)
    lstm_backward(dy, x, idx, params, y, c, gates) -> (dx_rows, dparams)

``x`` is either the input rows or, with ``idx``, a table whose rows ``idx`` are the input (the embedding
lookup fused into the first layer). Backends compute and return float32; the callers cast to the
parameters' dtype, as PEFT's modules would produce.

Under ``torch.compile`` everything traces without a graph break: the value checks of the token indices and
the output cache (which read tensor values) apply to eager calls only, and a P-tuning LSTM's parameters
come from a record on the encoder (see :func:`prepare_encoders`).

Backend choice (``FASTPROMPT_BACKEND``, as for the attention op): ``auto`` takes triton for CUDA tensors and
the PyTorch path for CPU tensors (there are no C++ encoder kernels, so ``cpu`` also means the PyTorch
path); ``triton`` forces the kernels (CPU tensors need ``TRITON_INTERPRET=1``); a forced backend that
cannot run raises :class:`~fastprompt.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import importlib
import weakref
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from fastprompt.attention import resolve_backend
from fastprompt.attention.dispatch import requested_backend
from fastprompt.errors import UnsupportedModelError

__all__ = [
    "clear_encoder_cache", "encode_prompt", "fused_lstm", "fused_mlp", "prepare_encoders", "resolve_encoder_backend"
]

_ACTS = ("tanh", "relu")


# ---------------------------------------------------------------------------------------------------
# The PyTorch path: one call per layer for all tokens; the LSTM does its input projections for all steps
# in one GEMM and runs both directions in the same step loop, with a hand-written backward through time
# (no autograd graph of per-step ops).
# ---------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half and single precision, float64 for float64 (a float64 run is an oracle: kept exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return (x if idx is None else x.index_select(0, idx)).to(_compute_dtype(x))


def _torch_mlp_forward(x, idx, weights, biases, act):
    h = _rows(x, idx)
    hiddens = []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.addmm(b.to(h.dtype), h, w.to(h.dtype).t())
        if i < len(weights) - 1:
            h = torch.tanh_(h) if act == "tanh" else torch.relu_(h)
            hiddens.append(h)
    return h, hiddens


def _torch_mlp_backward(grad, x, idx, weights, hiddens, act):
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


def _torch_lstm_forward(x, idx, params):
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


def _torch_lstm_backward(dy, x, idx, params, y, c, gates):
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


class _TorchBackend:
    mlp_forward = staticmethod(_torch_mlp_forward)
    mlp_backward = staticmethod(_torch_mlp_backward)
    lstm_forward = staticmethod(_torch_lstm_forward)
    lstm_backward = staticmethod(_torch_lstm_backward)


def resolve_encoder_backend(backend: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend the encoders run: the attention op's choice (:func:`fastprompt.resolve_backend`), with
    one difference: the encoders have no C++ kernels, so where the op would run ``cpu`` (asked for, or
    ``auto`` on a CPU tensor) they run PyTorch."""
    device = torch.device(device)
    requested = requested_backend(backend)
    if requested == "cpu" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    # head_dim 0: the encoder kernels have no head-dim limit
    return resolve_backend(device, dtype, head_dim=0, backend=requested)


def _backend(name: str) -> ModuleType | type[_TorchBackend]:
    if name == "triton":
        return importlib.import_module("fastprompt.kernels.prompt_encoders")
    return _TorchBackend


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------


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
            grad.to(_compute_dtype(x)).contiguous(), x, idx, list(params[0::2]), list(hiddens), ctx.act
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
    y, c, gates = _backend(backend).lstm_forward(x, idx, params)
    return y.contiguous(), c.contiguous(), gates.contiguous()


@_lstm_layer_fwd.register_fake
def _(x, idx, params, backend):
    rows, hidden = (x.shape[0] if idx is None else idx.shape[0]), params[1].shape[1]
    dtype = _compute_dtype(x)
    return (x.new_empty(rows, 2 * hidden, dtype=dtype), x.new_empty(2, rows, hidden, dtype=dtype),
            x.new_empty(2, rows, 4 * hidden, dtype=dtype))


@torch.library.custom_op("fastprompt::lstm_layer_bwd", mutates_args=())
def _lstm_layer_bwd(
    dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None, params: list[torch.Tensor], y: torch.Tensor,
    c: torch.Tensor, gates: torch.Tensor, backend: str,
) -> list[torch.Tensor]:
    """Gradients of :func:`_lstm_layer_fwd`: d x[idx] [P, D] in its compute dtype, then one per parameter, like it."""
    dx_rows, dparams = _backend(backend).lstm_backward(dy, x, idx, params, y, c, gates)
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


# ---------------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------------


def _check_idx(
    idx: torch.Tensor | None, table: torch.Tensor, name: str, *, host_ok: bool = False
) -> torch.Tensor | None:
    """Checks ``idx`` [P] against ``table`` [V, D] (on the table's device, or on the CPU if ``host_ok``)
    and returns it as contiguous int64. The range check reads the values: one sync for device tensors."""
    if idx is None:
        return None
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor [P], got {_describe(idx)}")
    if idx.device != table.device and not (host_ok and idx.device.type == "cpu"):
        raise ValueError(f"{name} is on {idx.device} but the encoder weights are on {table.device}")
    # while compiling, a value check would be a data-dependent branch (a graph break): the eager call checks
    if idx.numel() and not torch.compiler.is_compiling():
        low, high = torch.stack(torch.aminmax(idx)).tolist()  # one read of a device tensor
        if low < 0 or high >= table.shape[0]:
            raise ValueError(f"{name} values must lie in [0, {table.shape[0]}), got [{low}, {high}]")
    return idx.to(torch.int64).contiguous()


# Device copies of host token vectors, by (device, values): a steady-state forward neither copies nor syncs.
# Emptied by clear_encoder_cache().
_DEVICE_TOKENS: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _on_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tokens.device == device:
        return tokens
    if torch.compiler.is_compiling():
        return tokens.to(device)
    key = (device, tuple(tokens.tolist()))
    if key not in _DEVICE_TOKENS:
        # outside inference mode: a later training forward saves it for backward
        with torch.inference_mode(False):
            _DEVICE_TOKENS[key] = tokens.to(device)
    return _DEVICE_TOKENS[key]


def _as_table(x: Any) -> torch.Tensor:
    """``x``, checked to be 2-D: the rows [P, D], or the table [V, D] that an ``idx`` indexes."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [P, D], got {_describe(x)}")
    return x


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def fused_mlp(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    act: str = "relu",
    *,
    idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``Linear → act → Linear [→ act → Linear]`` over P tokens, forward and backward fused per layer.

    Args:
        x: [P, D] input rows, or with ``idx`` an embedding table [V, D] whose rows ``idx`` are the input.
        weights: 2 or 3 matrices [H1, D], [H2, H1], ... in ``torch.nn.Linear`` layout, same dtype as x.
        biases: one vector per weight, [H1], [H2], ...
        act: ``"tanh"`` or ``"relu"``, applied after every layer but the last.
        idx: [P] int64/int32 row indices into ``x`` (fuses the embedding lookup).
        backend: ``"triton"``, ``"torch"``/``"cpu"`` or ``"auto"``; default ``FASTPROMPT_BACKEND``.

    Returns:
        [P, O] in the weights' dtype; differentiable w.r.t. x, weights and biases.
    """
    return _fused_mlp(x, weights, biases, act, _check_idx(idx, _as_table(x), "idx"), backend)


def _fused_mlp(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], act: str,
    idx: torch.Tensor | None, backend: str | None,
) -> torch.Tensor:
    """:func:`fused_mlp` for a 2-D ``x`` and an ``idx`` that :func:`_check_idx` returned (no second value check)."""
    if act not in _ACTS:
        raise ValueError(f"act must be one of {_ACTS}, got {act!r}")
    if len(weights) not in (2, 3) or len(biases) != len(weights):
        raise ValueError(
            f"weights and biases must be 2 or 3 of each, got {len(weights)} weights and {len(biases)} biases"
        )
    width = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise ValueError(
                f"layer {i}: expected weight [*, {width}] and bias [{w.shape[0] if w.dim() else '*'}], "
                f"got weight {tuple(w.shape)} and bias {tuple(b.shape)}"
            )
        if w.dtype != x.dtype or b.dtype != x.dtype or w.device != x.device or b.device != x.device:
            raise ValueError(f"layer {i}: weights and biases must match x's dtype {x.dtype} and device {x.device}")
        width = w.shape[0]
    name = resolve_encoder_backend(backend, x.device, x.dtype)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return _MLPFunction.apply(x, idx, act, _backend(name), *params)


def fused_lstm(
    x: torch.Tensor,
    layers: list[list[torch.Tensor]],
    *,
    idx: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """A bidirectional LSTM (``torch.nn.LSTM(bidirectional=True, batch_first=True)``, zero initial state)
    over the P tokens of one sequence. On Triton each layer's recurrence (both directions) is one kernel
    launch while one SM can stream ``W_hh`` (H < 256), and one launch per time step spread over the SMs
    beyond that (see ``fastprompt.kernels.prompt_encoders``).

    Args:
        x: [P, D] inputs, or with ``idx`` a table [V, D] whose rows ``idx`` are the inputs.
        layers: per layer the 8 tensors of ``torch.nn.LSTM`` in its order: ``weight_ih`` [4H, D_l],
            ``weight_hh`` [4H, H], ``bias_ih`` [4H], ``bias_hh`` [4H], then the same for the reverse
            direction. Gates are (input, forget, cell, output); D_l is D for layer 0, else 2H.
        idx: [P] row indices into ``x``.
        dropout, training: dropout on the outputs of every layer but the last, as ``torch.nn.LSTM``.
        backend: as in :func:`fused_mlp`.

    Returns:
        [P, 2H], the forward direction's hidden states then the reverse direction's, in the weights' dtype.
    """
    return _fused_lstm(x, layers, _check_idx(idx, _as_table(x), "idx"), dropout, training, backend)


def _fused_lstm(
    x: torch.Tensor, layers: list[list[torch.Tensor]], idx: torch.Tensor | None, dropout: float, training: bool,
    backend: str | None,
) -> torch.Tensor:
    """:func:`fused_lstm` for a 2-D ``x`` and an ``idx`` that :func:`_check_idx` returned (no second value check)."""
    if not layers or any(len(layer) != 8 for layer in layers):
        raise ValueError("layers must be a non-empty list of 8-tensor lists (torch.nn.LSTM's per-layer params)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    width = x.shape[1]
    for i, layer in enumerate(layers):
        hidden = layer[1].shape[1]
        want = [(4 * hidden, width), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)] * 2
        got = [tuple(t.shape) for t in layer]
        if got != want:
            raise ValueError(f"layer {i}: expected parameter shapes {want}, got {got}")
        if any(t.dtype != x.dtype or t.device != x.device for t in layer):
            raise ValueError(f"layer {i}: parameters must match x's dtype {x.dtype} and device {x.device}")
        width = 2 * hidden
    name = resolve_encoder_backend(backend, x.device, x.dtype)
    h = x
    for i, layer in enumerate(layers):
        h = _lstm_layer_fwd(h, idx if i == 0 else None, list(layer), name)[0].to(layer[0].dtype)
        if i < len(layers) - 1 and dropout > 0 and training:
            h = F.dropout(h, dropout, training=True)
    return h


# ---------------------------------------------------------------------------------------------------
# PEFT encoders
# ---------------------------------------------------------------------------------------------------


def _linear_stack(seq: torch.nn.Module, pattern: tuple[type, ...], what: str) -> list[torch.nn.Linear]:
    if not isinstance(seq, torch.nn.Sequential) or tuple(type(m) for m in seq) != pattern:
        raise UnsupportedModelError(
            f"{what} must be torch.nn.Sequential({', '.join(p.__name__ for p in pattern)}), got {seq!r}"
        )
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    if any(m.bias is None for m in linears):
        raise UnsupportedModelError(f"{what}: every Linear needs a bias, as PEFT builds them")
    return linears


def _mlp_of(linears: list[torch.nn.Linear]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [m.weight for m in linears], [m.bias for m in linears]


def _lstm_layers(lstm: torch.nn.LSTM) -> list[list[torch.Tensor]]:
    if not (lstm.bidirectional and lstm.batch_first and lstm.bias and lstm.proj_size == 0):
        raise UnsupportedModelError(
            "the P-tuning LSTM must be bidirectional, batch_first, with biases and no projection "
            f"(as PEFT's PromptEncoder builds it), got {lstm!r}"
        )
    return [
        [getattr(lstm, f"{kind}_l{layer}{sfx}") for sfx in ("", "_reverse") for kind in
         ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        for layer in range(lstm.num_layers)
    ]


_LSTM_RECORD = "_fastprompt_lstm"


def _lstm_record(encoder: torch.nn.Module) -> tuple[list[list[torch.Tensor]], float]:
    """(per-layer parameters, dropout) of a P-tuning encoder's ``lstm_head``, kept on the encoder.

    Dynamo refuses to hold a ``torch.nn.LSTM`` at all (even to read its parameters), so a compiled forward
    reads this record instead. Every eager call and :func:`prepare_encoders` (called by ``fastprompt.patch``)
    rebuild it; after replacing the LSTM's parameter objects, run one of them before compiling.
    """
    if torch.compiler.is_compiling() and _LSTM_RECORD in encoder.__dict__:
        return encoder.__dict__[_LSTM_RECORD]
    lstm = encoder.lstm_head
    record = (_lstm_layers(lstm), lstm.dropout)
    if not torch.compiler.is_compiling():
        encoder.__dict__[_LSTM_RECORD] = record
    return record


def prepare_encoders(module: torch.nn.Module) -> None:
    """Make every P-tuning LSTM encoder in ``module`` traceable by ``torch.compile`` (see :func:`_lstm_record`)."""
    for encoder in module.modules():
        if isinstance(getattr(encoder, "lstm_head", None), torch.nn.LSTM):
            _lstm_record(encoder)


def _run_encoder(encoder: torch.nn.Module, tokens: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``encoder`` on ``tokens`` [P], which :func:`encode_prompt` checked and put on the weights' device."""
    from peft.tuners.p_tuning.model import PromptEncoder, PromptEncoderReparameterizationType
    from peft.tuners.prefix_tuning.model import PrefixEncoder
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    table = encoder.embedding.weight
    if isinstance(encoder, PrefixEncoder):
        if encoder.prefix_projection and hasattr(encoder, "transform"):
            linears = _linear_stack(
                encoder.transform, (torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear), "PrefixEncoder.transform"
            )
            return _fused_mlp(table, *_mlp_of(linears), "tanh", tokens, backend)
        # without projection (or in inference mode) the learned table *is* the output, as in get_prompt()
        return F.embedding(tokens, table)
    if isinstance(encoder, PromptEncoder):
        if not hasattr(encoder, "mlp_head"):
            return F.embedding(tokens, table)
        relu_mlp = (torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear)
        if encoder.encoder_type == PromptEncoderReparameterizationType.MLP:
            linears = _linear_stack(encoder.mlp_head, (*relu_mlp, torch.nn.ReLU, torch.nn.Linear), "mlp_head")
            return _fused_mlp(table, *_mlp_of(linears), "relu", tokens, backend)
        if encoder.encoder_type == PromptEncoderReparameterizationType.LSTM:
            layers, dropout = _lstm_record(encoder)
            hidden = _fused_lstm(table, layers, tokens, dropout, encoder.training, backend)
            linears = _linear_stack(encoder.mlp_head, relu_mlp, "mlp_head")
            return _fused_mlp(hidden, *_mlp_of(linears), "relu", None, backend)
        raise UnsupportedModelError(f"unknown P-tuning encoder type {encoder.encoder_type!r}")
    if type(encoder) is PromptEmbedding:
        return F.embedding(tokens, table)
    raise UnsupportedModelError(
        f"encode_prompt handles PEFT's PrefixEncoder, PromptEncoder and PromptEmbedding, got {type(encoder).__name__}"
    )


# Per encoder: (key, tokens, output). Weak keys: a dropped encoder drops its cache entry.
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.Tensor, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _state_key(encoder: torch.nn.Module, backend: str | None) -> tuple:
    # An in-place update (optimizer step, load_state_dict, copy_ under no_grad) bumps ``_version``; a new
    # tensor put in place changes identity or data_ptr. Writes through ``param.data`` are invisible to
    # both: call clear_encoder_cache() after those.
    params = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in encoder.parameters())
    return params, backend, torch.is_inference_mode_enabled()


def _deterministic(encoder: torch.nn.Module) -> bool:
    return not any(isinstance(m, torch.nn.LSTM) and m.training and m.dropout > 0 for m in encoder.modules())


def clear_encoder_cache(encoder: torch.nn.Module | None = None) -> None:
    """Forget the cached output of ``encoder`` (all encoders, and the device copies of their tokens, if None)."""
    if encoder is None:
        _CACHE.clear()
        _DEVICE_TOKENS.clear()
    else:
        _CACHE.pop(encoder, None)


def _is_sharded(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def encode_prompt(encoder: torch.nn.Module, prompt_tokens: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Run a PEFT prompt encoder once on its virtual tokens with the fused kernels.

    Args:
        encoder: ``peft_model.prompt_encoder[adapter_name]``: a ``PrefixEncoder`` (MLP projection or plain
            table), a ``PromptEncoder`` (P-tuning MLP or LSTM+MLP; in inference mode a plain table) or a
            ``PromptEmbedding``.
        prompt_tokens: [P] integer indices into the encoder's embedding (PEFT's ``prompt_tokens`` sliced as
            ``get_prompt`` does), on the encoder's device or on the CPU. CPU tokens (PEFT keeps them there)
            are checked and compared with the cached ones on the host and copied to the device once, so a
            forward does not wait for the GPU; device tokens cost a sync for the range check.
        backend: as in :func:`fused_mlp`.

    Returns:
        [P, out_dim], equal to ``encoder(prompt_tokens[None])[0]`` (for inference-mode encoders: the rows of
        ``encoder.embedding.weight``, as PEFT's ``get_prompt`` uses), in the encoder's dtype, differentiable
        w.r.t. every encoder parameter. When no gradient is needed (``torch.no_grad()``, inference mode or
        a frozen encoder) and the encoder is deterministic (no active LSTM dropout), the output is cached
        and recomputed only after a parameter changed (in-place update, ``load_state_dict``, replaced
        tensor, other dtype or device) or ``prompt_tokens`` differ. Treat the result as read-only.
    """
    if not isinstance(encoder, torch.nn.Module) or not hasattr(encoder, "embedding"):
        raise UnsupportedModelError(
            f"encoder must be a PEFT prompt encoder module with an `embedding`, got {type(encoder).__name__}"
        )
    if not isinstance(prompt_tokens, torch.Tensor) or prompt_tokens.dim() != 1:
        raise ValueError(f"prompt_tokens must be a 1-D integer tensor [P], got {_describe(prompt_tokens)}")
    weight = encoder.embedding.weight
    if _is_sharded(weight):
        raise UnsupportedModelError(
            f"the prompt encoder's parameters are sharded DTensors ({type(encoder).__name__} is an FSDP unit of its "
            "own, whose hooks never fire because it runs as a function of its parameters): shard the model with "
            "fastprompt.shard_prompt_model(model), which keeps prompt encoders in the root unit"
        )
    tokens = _check_idx(prompt_tokens, weight, "prompt_tokens", host_ok=True)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
    # a compiled graph recomputes the encoder: the cache's checks read tensor values and versions
    if torch.compiler.is_compiling() or needs_grad or not _deterministic(encoder):
        return _run_encoder(encoder, _on_device(tokens, weight.device), backend)
    key = _state_key(encoder, backend)
    hit = _CACHE.get(encoder)
    if (hit is not None and hit[0] == key and hit[1].device == tokens.device and hit[1].shape == tokens.shape
            and torch.equal(hit[1], tokens)):
        return hit[2]
    out = _run_encoder(encoder, _on_device(tokens, weight.device), backend)
    _CACHE[encoder] = (key, tokens.clone(), out)
    return out
