"""Prompt tuning (Lester et al. 2021): a learned table of virtual-token embeddings [P, hidden], prepended to
the input (PEFT's ``PromptEmbedding``)."""

from __future__ import annotations

from typing import Any

import torch

from fastprompt.methods.soft_prompt import SoftPrompt

__all__ = ["PromptTuning"]


class PromptTuning(SoftPrompt):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    def _new_encoder(self, config: Any) -> torch.nn.Module:
        from peft.tuners.prompt_tuning.model import PromptEmbedding

        # word_embeddings only initialise a TEXT-initialised table, which the saved weights replace
        return PromptEmbedding(config, None)
