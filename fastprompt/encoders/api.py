"""The public encoder functions and their argument checks: :func:`fused_mlp`, :func:`fused_lstm` and
:func:`encode_prompt`, which runs a PEFT encoder's plan (:mod:`.peft_modules`) through the first two.

Under ``torch.compile`` everything traces without a graph break: the value checks of the token indices and
the cache (which read tensor values) apply to eager calls only, and a P-tuning LSTM's parameters come from a
record on the encoder (see :func:`~fastprompt.encoders.peft_modules.prepare_encoders`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastprompt.encoders import autograd
from fastprompt.encoders.backends import resolve_encoder_backend
from fastprompt.encoders.cache import EncoderCache, state_key
from fastprompt.encoders.peft_modules import EncoderPlan, plan_of
from fastprompt.errors import UnsupportedModelError

__all__ = ["encode_prompt", "fused_lstm", "fused_mlp"]

_ACTS = ("tanh", "relu")


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
        backend: ``"triton"``, ``"torch"``, ``"cpu"`` (an alias of ``"torch"``: there are no C++ encoder
            kernels) or ``"auto"``; default ``FASTPROMPT_BACKEND`` (see :mod:`fastprompt.encoders.backends`).

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
    return autograd.mlp(x, idx, act, resolve_encoder_backend(backend, x.device, x.dtype), weights, biases)


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
        h = autograd.lstm_layer(h, idx if i == 0 else None, list(layer), name)
        if i < len(layers) - 1 and dropout > 0 and training:
            h = F.dropout(h, dropout, training=True)
    return h


def _run(plan: EncoderPlan, tokens: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``plan`` on ``tokens`` [P] (checked, on the table's device): [P, out_dim] in the parameters' dtype."""
    if not plan.weights:
        return F.embedding(tokens, plan.table)
    x, idx = plan.table, tokens
    if plan.lstm_layers:
        x, idx = _fused_lstm(x, plan.lstm_layers, idx, plan.lstm_dropout, plan.training, backend), None
    return _fused_mlp(x, plan.weights, plan.biases, plan.act, idx, backend)


def _is_sharded(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def encode_prompt(
    encoder: torch.nn.Module,
    prompt_tokens: torch.Tensor,
    *,
    backend: str | None = None,
    cache: EncoderCache | None = None,
) -> torch.Tensor:
    """Run a PEFT prompt encoder once on its virtual tokens with the fused kernels.

    Args:
        encoder: ``peft_model.prompt_encoder[adapter_name]``: a ``PrefixEncoder`` (MLP projection or plain
            table), a ``PromptEncoder`` (P-tuning MLP or LSTM+MLP; in inference mode a plain table) or a
            ``PromptEmbedding``.
        prompt_tokens: [P] integer indices into the encoder's embedding (PEFT's ``prompt_tokens`` sliced as
            ``get_prompt`` does), on the encoder's device or on the CPU (where PEFT keeps them; checked there).
        backend: as in :func:`fused_mlp`.
        cache: where to keep this encoder's output and the device copy of its tokens, owned by the caller
            (a patched model, a template model). Without one nothing is kept: every call copies host tokens
            to the device and computes.

    Returns:
        [P, out_dim], equal to ``encoder(prompt_tokens[None])[0]`` (for inference-mode encoders: the rows of
        ``encoder.embedding.weight``, as PEFT's ``get_prompt`` uses), in the encoder's dtype, differentiable
        w.r.t. every encoder parameter. With a ``cache``, when no gradient is needed (``torch.no_grad()``,
        inference mode or a frozen encoder) and the encoder is deterministic (no active LSTM dropout), the
        output is kept and recomputed only after a parameter changed (in-place update, ``load_state_dict``,
        replaced tensor, other dtype or device; see :func:`~fastprompt.encoders.cache.state_key`) or
        ``prompt_tokens`` differ. Treat the result as read-only.
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
    plan = plan_of(encoder)
    # a compiled graph recomputes the encoder: the cache's checks read tensor values and versions
    if cache is None or torch.compiler.is_compiling():
        return _run(plan, tokens.to(weight.device), backend)
    on_device = cache.tokens_on(encoder, tokens, weight.device)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
    drops_out = bool(plan.lstm_layers) and plan.training and plan.lstm_dropout > 0
    if needs_grad or drops_out:
        return _run(plan, on_device, backend)
    state = state_key(encoder, backend)
    out = cache.output(encoder, state)
    if out is None:
        out = _run(plan, on_device, backend)
        cache.store(encoder, state, out)
    return out
