"""PEFT's prompt encoder modules read as plans: which table, LSTM and MLP an encoder's output is made of.

:func:`plan_of` matches ``PrefixEncoder`` (MLP projection or plain table), ``PromptEncoder`` (P-tuning MLP or
LSTM+MLP; in inference mode a plain table) and ``PromptEmbedding``, checks that their layers are built as
PEFT builds them, and returns their tensors; :func:`fastprompt.encoders.encode_prompt` runs the plan. Nothing
here computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastprompt.errors import UnsupportedModelError

__all__ = ["EncoderPlan", "plan_of", "prepare_encoders"]


class EncoderPlan(NamedTuple):
    """What an encoder computes on its tokens ``idx`` [P]: ``table[idx]`` → LSTM (if any) → MLP (if any).

    ``table``: [V, D] the encoder's embedding weight. ``lstm_layers``: per layer the 8 tensors of
    ``torch.nn.LSTM`` (see :func:`fastprompt.fused_lstm`), empty for none; ``lstm_dropout`` between its layers
    while ``training``. ``weights`` / ``biases``: the MLP's ``Linear`` layers, empty for none; ``act`` between them.
    """

    table: torch.Tensor
    lstm_layers: list[list[torch.Tensor]]
    lstm_dropout: float
    training: bool
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    act: str


def _linear_stack(seq: torch.nn.Module, pattern: tuple[type, ...], what: str) -> list[torch.nn.Linear]:
    if not isinstance(seq, torch.nn.Sequential) or tuple(type(m) for m in seq) != pattern:
        raise UnsupportedModelError(
            f"{what} must be torch.nn.Sequential({', '.join(p.__name__ for p in pattern)}), got {seq!r}"
        )
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    if any(m.bias is None for m in linears):
        raise UnsupportedModelError(f"{what}: every Linear needs a bias, as PEFT builds them")
    return linears


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


def _plan(
    encoder: torch.nn.Module, linears: Sequence[torch.nn.Linear] = (), act: str = "relu",
    lstm: tuple[Sequence[list[torch.Tensor]], float] = ((), 0.0),
) -> EncoderPlan:
    return EncoderPlan(
        encoder.embedding.weight, list(lstm[0]), lstm[1], encoder.training,
        [m.weight for m in linears], [m.bias for m in linears], act,
    )


def plan_of(encoder: torch.nn.Module) -> EncoderPlan:
    """The plan of a PEFT prompt encoder module; :class:`~fastprompt.errors.UnsupportedModelError` for any other."""
    from peft.tuners.p_tuning.model import PromptEncoder, PromptEncoderReparameterizationType
    from peft.tuners.prefix_tuning.model import PrefixEncoder
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    if isinstance(encoder, PrefixEncoder):
        # without projection (or in inference mode) the learned table *is* the output, as in get_prompt()
        if not (encoder.prefix_projection and hasattr(encoder, "transform")):
            return _plan(encoder)
        pattern = (torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear)
        return _plan(encoder, _linear_stack(encoder.transform, pattern, "PrefixEncoder.transform"), "tanh")
    if isinstance(encoder, PromptEncoder):
        if not hasattr(encoder, "mlp_head"):
            return _plan(encoder)
        relu_mlp = (torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear)
        if encoder.encoder_type == PromptEncoderReparameterizationType.MLP:
            deep_mlp = (*relu_mlp, torch.nn.ReLU, torch.nn.Linear)
            return _plan(encoder, _linear_stack(encoder.mlp_head, deep_mlp, "mlp_head"))
        if encoder.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return _plan(encoder, _linear_stack(encoder.mlp_head, relu_mlp, "mlp_head"), lstm=_lstm_record(encoder))
        raise UnsupportedModelError(f"unknown P-tuning encoder type {encoder.encoder_type!r}")
    if type(encoder) is PromptEmbedding:
        return _plan(encoder)
    raise UnsupportedModelError(
        f"encode_prompt handles PEFT's PrefixEncoder, PromptEncoder and PromptEmbedding, got {type(encoder).__name__}"
    )
