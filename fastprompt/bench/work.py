"""The work a benchmark times: an optimizer step and greedy generation, and PEFT's own path spelled out
where PEFT's ``generate`` cannot be the baseline (:func:`peft_prefix_generate`).
"""

from __future__ import annotations

from typing import Any

import torch

from fastprompt.bench.models import PAD_TOKEN_ID

__all__ = ["generate_step", "make_optimizer", "peft_prefix_generate", "peft_prefix_inputs", "train_step"]


# The value changes no work an AdamW step does; the benchmark times steps, not convergence.
_LEARNING_RATE = 1e-4


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the adapter's trainable parameters (the base model is frozen)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_LEARNING_RATE)


def train_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One optimizer step: forward with labels, backward, AdamW step. Returns the (detached) loss."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def generate_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens per row; returns [B, T + new_tokens] ids."""
    with torch.inference_mode():
        return model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
        )


def peft_prefix_inputs(model: torch.nn.Module, attention_mask: torch.Tensor) -> dict[str, Any]:
    """The base model's inputs that carry a PEFT prefix-tuning adapter the way PEFT hands it over: the prefix
    K/V of every row (PEFT's ``get_prompt``) in a KV cache under the model's cache argument, and
    ``attention_mask`` [B, T] widened to [B, P + T] by ones in front. The base model numbers the tokens after
    its cache, as it does for PEFT. Differentiable: gradients reach the adapter."""
    from fastprompt.hf import compat

    rows = attention_mask.shape[0]
    cache = compat.peft_prefix_cache(model, rows)
    prefix_len = compat.cache_layer_kv(cache)[0][0].shape[2]
    mask = torch.cat([attention_mask.new_ones(rows, prefix_len), attention_mask], dim=1)
    return {"attention_mask": mask, compat.cache_kwarg(model.get_base_model()): cache}


def peft_prefix_generate(model: torch.nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """What PEFT's prefix-tuning ``generate`` does, spelled out (:func:`peft_prefix_inputs`), greedy.
    [B, T + new]

    PEFT 0.21's own ``generate`` hands the prefix to transformers 5.24 under a name it no longer reads and
    silently generates without it, so it cannot be the baseline; this is the same work done correctly.
    """
    with torch.inference_mode():
        return model.get_base_model().generate(
            input_ids=batch["input_ids"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
            **peft_prefix_inputs(model, batch["attention_mask"]),
        )
