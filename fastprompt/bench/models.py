"""Random-weight models, PEFT adapters and batches for benchmarks: what a case is made of.

- :class:`ModelShape` / :func:`build_base_model`: a random-weight Llama-shaped model, or a local checkpoint
  directory (never downloaded); real checkpoints shipped by packages are in :mod:`.pretrained`;
- :func:`peft_config` / :func:`wrap`: the PEFT adapter of each method (:data:`METHODS`, and ``p-tuning-lstm``);
- :func:`random_batch`: random token ids with realistic left padding;
- :func:`build_case`: the three above in one call, ``(peft_model, batch)``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastprompt.errors import first_line

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

__all__ = [
    "METHODS", "PAD_TOKEN_ID", "CheckpointError", "ModelShape", "build_base_model", "build_case", "peft_config",
    "random_batch", "wrap",
]


METHODS = ("prefix-tuning", "p-tuning-v2", "p-tuning")
"""Training rows: prefix-tuning with its projection MLP, P-tuning v2 (deep prompts), P-tuning."""


PAD_TOKEN_ID = 0


class CheckpointError(ValueError):
    """A local checkpoint given with ``--model`` that cannot be loaded."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder; the MLP is ``4 * hidden`` wide (as in Llama 3.2 1B)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def check(self) -> None:
        """Raise ValueError naming the first size that cannot make a Llama model."""
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.vocab < 2:
            raise ValueError(f"vocab must be at least 2 (token 0 is padding), got {self.vocab}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(
                f"hidden / heads = {self.hidden // self.heads} must be even (rotary embeddings rotate pairs)"
            )

    def describe(self) -> str:
        return (
            f"random-weight Llama: hidden {self.hidden}, layers {self.layers}, "
            f"heads {self.heads} / KV heads {self.kv_heads}, vocab {self.vocab}"
        )


def build_base_model(
    model: ModelShape | str | os.PathLike,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    max_positions: int = 4096,
    seed: int = 0,
) -> torch.nn.Module:
    """A causal LM in training mode: random weights for a shape, or a local checkpoint.

    A checkpoint is loaded with ``local_files_only=True``: this never downloads.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    if isinstance(model, ModelShape):
        model.check()
        config = LlamaConfig(
            hidden_size=model.hidden,
            intermediate_size=4 * model.hidden,
            num_hidden_layers=model.layers,
            num_attention_heads=model.heads,
            num_key_value_heads=model.kv_heads,
            vocab_size=model.vocab,
            max_position_embeddings=max_positions,
            pad_token_id=PAD_TOKEN_ID,
        )
        torch.manual_seed(seed)
        # Initialise on the target device: a 1B model initialised on the CPU takes minutes.
        with device:
            base = LlamaForCausalLM(config)
        base.to(dtype)
    else:
        try:
            base = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=dtype).to(device)
        except Exception as exc:  # safetensors, torch and OS errors alike: the checkpoint cannot be read
            raise CheckpointError(f"cannot load {model}: {first_line(exc)}") from exc
    return base.train()


def peft_config(method: str, model_config: Any, prefix_len: int) -> PeftConfig:
    """The PEFT config of ``method`` for a model with ``model_config`` and ``prefix_len`` virtual tokens.

    prefix-tuning: a projection MLP as wide as the model (Li & Liang); p-tuning-v2: learned per-layer
    keys and values, no projection; p-tuning: PEFT's prompt encoder (an MLP) feeding virtual tokens;
    p-tuning-lstm: the same with the LSTM encoder.
    """
    from peft import PrefixTuningConfig, PromptEncoderConfig

    if prefix_len < 1:
        raise ValueError(f"prefix_len must be a positive integer, got {prefix_len}")
    if method == "prefix-tuning":
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_len,
            prefix_projection=True,
            encoder_hidden_size=model_config.hidden_size,
        )
    if method == "p-tuning-v2":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len, prefix_projection=False)
    if method in _PROMPT_ENCODER_TYPES:
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_len,
            encoder_reparameterization_type=_PROMPT_ENCODER_TYPES[method],
            encoder_hidden_size=model_config.hidden_size,
        )
    raise ValueError(f"method must be one of {', '.join((*METHODS, 'p-tuning-lstm'))}; got {method!r}")


# P-tuning's prompt encoder by method name: the bench rows use PEFT's default MLP; the LSTM one is P-tuning's
# original encoder (benchmarks/bench_real.py trains it).
_PROMPT_ENCODER_TYPES = {"p-tuning": "MLP", "p-tuning-lstm": "LSTM"}


def wrap(method: str, base: torch.nn.Module, prefix_len: int) -> PeftModel:
    """``base`` wrapped in a fresh PEFT adapter of ``method`` (the PeftModel, on base's device and dtype)."""
    from peft import get_peft_model

    peft_model = get_peft_model(base, peft_config(method, base.config, prefix_len))
    param = next(base.parameters())
    return peft_model.to(device=param.device, dtype=param.dtype)


def random_batch(
    vocab: int, batch: int, seq_len: int, *, device: torch.device | str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids in ``[1, vocab)`` with left padding on every row but the first.

    Returns ``input_ids`` and ``labels`` [B, T] (long; labels are -100 on padding) and ``attention_mask``
    [B, T] (long, 1 = real token). Row ``b > 0`` has up to ``T // 4`` padding tokens in front, as a batch
    of prompts of different lengths has.
    """
    if vocab < 2:
        raise ValueError(f"vocab must be at least 2 (token 0 is padding), got {vocab}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seq_len), generator=gen)
    pad = torch.randint(0, seq_len // 4 + 1, (batch,), generator=gen)
    pad[0] = 0
    attention_mask = (torch.arange(seq_len)[None, :] >= pad[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch_dict = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: t.to(device) for name, t in batch_dict.items()}


def build_case(
    method: str,
    model: ModelShape | str | os.PathLike,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    batch: int,
    seq_len: int,
    prefix_len: int,
    seed: int = 0,
) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """``(peft_model, batch)``: a fresh base model wrapped with ``method``'s adapter, and a random batch."""
    base = build_base_model(model, device=device, dtype=dtype, max_positions=seq_len + prefix_len, seed=seed)
    peft_model = wrap(method, base, prefix_len)
    return peft_model, random_batch(base.config.vocab_size, batch, seq_len, device=device, seed=seed)
