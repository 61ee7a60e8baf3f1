"""A cached prompt: a fixed run of real tokens (few-shot demonstrations, a system prompt) whose keys and values,
computed once by the frozen causal model, serve as a read-only prefix. Not a PEFT adapter; nothing trains."""

from __future__ import annotations

from typing import Any

from fastprompt.methods.base import ModelFit, Output, PromptMethod, Training

__all__ = ["CachedPrompt"]


class CachedPrompt(PromptMethod):
    name = "cached_prompt"
    peft_type = None
    output = Output.TOKENS
    training = Training.FROZEN

    def length(self, config: Any) -> int:
        """``config`` is the prompt's token ids [1, P]."""
        return config.shape[-1]

    def check_config(self, config: Any) -> None:
        """A cached prompt has no PEFT config: its tokens are checked by :func:`fastprompt.cache_prompt`."""

    def mismatch(self, config: Any, model: ModelFit) -> str | None:
        return None
