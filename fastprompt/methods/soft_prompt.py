"""What P-tuning and prompt tuning share: virtual tokens that enter as input embeddings [P, hidden]."""

from __future__ import annotations

from typing import Any

from fastprompt.methods.base import ModelFit, Output, PromptMethod, Training

__all__ = ["SoftPrompt"]


class SoftPrompt(PromptMethod):
    """A method whose ``P`` virtual tokens are input embeddings of the model's width.

    Trained by prepending them to each row's input embeddings, as PEFT does (outputs over ``P + T``
    positions); served by running them once through the frozen causal model, whose keys and values then
    form the prefix.
    """

    output = Output.EMBEDDINGS
    training = Training.PREPEND

    def mismatch(self, config: Any, model: ModelFit) -> str | None:
        if config.token_dim == model.hidden_size:
            return None
        return (
            f"has virtual tokens of hidden size {config.token_dim} but this model's input embeddings have hidden "
            f"size {model.hidden_size}"
        )
