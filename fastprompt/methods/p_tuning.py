"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens through an MLP or a bidirectional LSTM
and an MLP (PEFT's ``PromptEncoder``), prepended as input embeddings [P, hidden]."""

from __future__ import annotations

from typing import Any

import torch

from fastprompt.methods.soft_prompt import SoftPrompt

__all__ = ["PTuning"]


class PTuning(SoftPrompt):
    name = "p_tuning"
    peft_type = "P_TUNING"

    def _new_encoder(self, config: Any) -> torch.nn.Module:
        from peft.tuners.p_tuning.model import PromptEncoder

        return PromptEncoder(config)
