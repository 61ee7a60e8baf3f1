"""What every prompt-learning method declares, and the model facts a method is checked against.

A method is one declared thing, as an attention backend is: what it reads (PEFT's config and the saved
``prompt_embeddings`` tensor, or a prompt's token ids), its encoder, what it produces, where the real tokens
after it start, whether and how it trains, and whether it fits a model. Callers ask the method; they never
branch on its type. The methods themselves are the modules beside this one, gathered in
:mod:`fastprompt.methods` (the table).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastprompt.encoders import EncoderCache, encode_prompt
from fastprompt.errors import UnsupportedModelError
from fastprompt.prefix.bank import KVGeometry

__all__ = ["AdapterFitError", "ModelFit", "Output", "PromptMethod", "Training", "require_causal"]


class Output(enum.Enum):
    """What a method yields for its ``P`` positions."""

    KV = "kv"  # per-layer keys and values [L, 2, Hkv, P, D], from the adapter's own parameters
    EMBEDDINGS = "embeddings"  # input embeddings [P, hidden] of P virtual tokens
    TOKENS = "tokens"  # token ids [1, P] of a fixed prompt


class Training(enum.Enum):
    """How a method's parameters learn."""

    PREFIX = "prefix"  # the op carries the gradient of the prefix keys and values back to the encoder
    PREPEND = "prepend"  # the virtual tokens are prepended to the input embeddings (outputs over P + T positions)
    FROZEN = "frozen"  # nothing to train


class AdapterFitError(UnsupportedModelError, ValueError):
    """An adapter made for another model: the message names the dimension that differs.

    Both an :class:`~fastprompt.UnsupportedModelError` (this model cannot run it) and a ``ValueError`` (the
    input is wrong for it), so callers catching either see it.
    """


def require_causal(base: torch.nn.Module, what: str) -> None:
    """Raise :class:`~fastprompt.UnsupportedModelError` unless every attention module of ``base`` is causal."""
    flags = [m.is_causal for m in base.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not flags or not all(flags):
        raise UnsupportedModelError(
            f"{what} needs a causal (decoder) model, but {type(base).__name__} attends bidirectionally: its leading "
            "tokens would attend to each row's own tokens, so their keys and values cannot be computed once for all "
            "rows"
        )


@dataclass(frozen=True)
class ModelFit:
    """What a method is checked against: the base model's key/value geometry and input embedding width.

    ``model``: the ``transformers`` model that runs (a ``PeftModel``'s base model), kept for the causal check,
    which walks its attention modules only when a method needs it.
    """

    geometry: KVGeometry
    hidden_size: int
    model: torch.nn.Module

    @classmethod
    def of(cls, base: Any) -> ModelFit:
        return cls(KVGeometry.from_config(base.config), base.get_input_embeddings().embedding_dim, base)


class PromptMethod:
    """One prompt-learning method. Subclasses set the class attributes and, where they differ, the hooks.

    ``name``: the kind a prefix of this method is registered and exported under. ``peft_type``: the type
    PEFT writes in ``adapter_config.json`` (``None``: not a PEFT adapter). ``output`` and ``training``: see
    :class:`Output` and :class:`Training`. An output other than :attr:`Output.KV` becomes keys and values only
    by running the frozen model over it once (:func:`fastprompt.hf.soft_prompts.prompt_kv`), which is exact on
    causal models only.
    """

    name: ClassVar[str]
    peft_type: ClassVar[str | None]
    output: ClassVar[Output]
    training: ClassVar[Training]

    def __repr__(self) -> str:
        return f"<prompt-learning method {self.name}>"

    def __str__(self) -> str:
        """The name users know it by in messages: PEFT's type, or the method's name."""
        return self.peft_type or self.name

    # -- reading PEFT's format ------------------------------------------------------------------------

    def _new_encoder(self, config: Any) -> torch.nn.Module:
        """PEFT's encoder module for ``config`` (inference mode: a plain table of the encoder's output)."""
        raise UnsupportedModelError(f"{self.name} has no PEFT encoder")

    def build_encoder(self, config: Any, prompt_embeddings: torch.Tensor) -> torch.nn.Module:
        """PEFT's inference-mode encoder of a saved adapter, holding ``prompt_embeddings`` [P, out_dim].

        PEFT saves the encoder's *output* for the virtual tokens (the projection MLP, the P-tuning MLP or LSTM
        already applied), so a saved adapter is rebuilt as a plain table whatever it was trained with.
        ``config`` is not modified. Returns the module in eval mode with frozen weights, on the device and in
        the dtype of ``prompt_embeddings``.
        """
        self.check_config(config)
        config = copy.copy(config)
        config.inference_mode = True
        encoder = self._new_encoder(config)
        want = tuple(encoder.embedding.weight.shape)
        if tuple(prompt_embeddings.shape) != want:
            raise ValueError(
                f"the saved prompt_embeddings have shape {tuple(prompt_embeddings.shape)} but the adapter's config "
                f"({self}, {config.num_virtual_tokens} virtual tokens) needs {want}"
            )
        encoder.embedding.weight = torch.nn.Parameter(prompt_embeddings.detach().clone(), requires_grad=False)
        return encoder.eval()

    def check_config(self, config: Any) -> None:
        """Raise :class:`~fastprompt.UnsupportedModelError` for a configuration fastprompt does not run."""
        if (getattr(config, "num_transformer_submodules", None) or 1) != 1:
            raise UnsupportedModelError(
                "prompt learning on encoder-decoder models (two transformer submodules) is not supported"
            )

    # -- what it produces -----------------------------------------------------------------------------

    def length(self, config: Any) -> int:
        """``P``: the positions in front of the real tokens, which are numbered from ``P``."""
        return config.num_virtual_tokens

    def virtual_tokens(self, config: Any) -> torch.Tensor:
        """The ids [P] the encoder reads: PEFT's ``prompt_tokens`` of one transformer submodule."""
        return torch.arange(self.length(config))

    def produce(self, encoder: torch.nn.Module, config: Any, cache: EncoderCache | None = None) -> torch.Tensor:
        """The encoder's output for the virtual tokens, shaped as :attr:`output` says.

        Runs through :func:`fastprompt.encode_prompt`: differentiable under autograd; kept in ``cache`` (owned
        by the caller) while the encoder's parameters do not change, where no gradient is needed.
        """
        self.check_config(config)
        return encode_prompt(encoder, self.virtual_tokens(config), cache=cache)

    # -- fitting a model ------------------------------------------------------------------------------

    def mismatch(self, config: Any, model: ModelFit) -> str | None:
        """What in ``config`` differs from ``model``'s dimensions (``None``: it fits)."""
        return None

    def check_fits(self, config: Any, model: ModelFit, what: str, *, compiled: bool) -> None:
        """Raise unless an adapter of this method with ``config`` runs on ``model``.

        ``what`` names the adapter in the message. ``compiled``: its output is to become keys and values once
        (serving), which needs a causal model unless the method yields keys and values itself.
        """
        self.check_config(config)
        problem = self.mismatch(config, model)
        if problem is not None:
            raise AdapterFitError(f"{what} {problem}")
        if compiled and self.output is not Output.KV:
            require_causal(model.model, f"{what} (compiled to keys and values once)")
