"""Tiny random-weight models and PEFT prompt-learning adapters of every architecture, for the model tests.

Every architecture is built from a config with a few dozen hidden units and two layers, so a forward
takes milliseconds on CPU. Dropout is off everywhere so that train-mode runs are deterministic and
patched and unpatched models can be compared bit for bit (up to the attention kernel's rounding).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DynamicCache,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

VOCAB = 96
PAD = 1  # RoBERTa's padding index; the same id pads every architecture
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")
ENCODERS = ("bert", "roberta")
ARCHITECTURES = DECODERS + ENCODERS
METHODS = ("prefix_projection", "prefix", "p_tuning_mlp", "p_tuning_lstm", "prompt_tuning")
TASKS = {
    "causal_lm": (TaskType.CAUSAL_LM, AutoModelForCausalLM),
    "seq_cls": (TaskType.SEQ_CLS, AutoModelForSequenceClassification),
    "token_cls": (TaskType.TOKEN_CLS, AutoModelForTokenClassification),
}


def tiny_config(arch: str, *, gqa: bool = False, hidden: int = 32, layers: int = 2, heads: int = 4,
                max_positions: int = 256, **overrides: Any) -> PretrainedConfig:
    """A small config of ``arch``; ``gqa`` gives half as many key/value heads as query heads.

    ``overrides`` are further config arguments (they win over the defaults here).
    """
    kv_heads = heads // 2 if gqa else heads
    common: dict[str, Any] = dict(
        vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=2, eos_token_id=3, num_labels=3, classifier_dropout=0.0
    )
    common.update(overrides)
    if arch in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "gemma": GemmaConfig}[arch]
        extra: dict[str, Any] = {"head_dim": hidden // heads}
        if arch == "mistral":
            extra["sliding_window"] = None
        if arch in ("qwen2", "qwen3"):
            extra["use_sliding_window"] = False
        return cls(**{
            **extra, **common,
            "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_positions, "attention_dropout": 0.0, "tie_word_embeddings": False,
        })
    if gqa:
        raise ValueError(f"{arch} has no grouped-query attention")
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, **common,
        )
    if arch in ENCODERS:
        cls = BertConfig if arch == "bert" else RobertaConfig
        return cls(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=max_positions + PAD + 1, **common,
        )
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


def tiny_model(arch: str, task: str = "causal_lm", *, gqa: bool = False, seed: int = 0,
               attn_implementation: str = "sdpa", **config_kwargs: Any) -> PreTrainedModel:
    """A randomly initialised ``arch`` model with the head of ``task`` (a key of :data:`TASKS`)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, gqa=gqa, **config_kwargs)
    return TASKS[task][1].from_config(config, attn_implementation=attn_implementation)


def peft_config(method: str, task: str, *, num_virtual_tokens: int = 5, encoder_hidden: int = 48) -> Any:
    """The PEFT config of ``method`` (one of :data:`METHODS`) for ``task``.

    ``prefix_projection``: prefix tuning with its two-layer MLP; ``prefix``: P-tuning v2 / deep prompt
    tuning (a learned K/V per layer); ``p_tuning_mlp`` / ``p_tuning_lstm``: P-tuning's prompt encoder;
    ``prompt_tuning``: learned input embeddings.
    """
    task_type = TASKS[task][0]
    if method in ("prefix_projection", "prefix"):
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=num_virtual_tokens,
            prefix_projection=method == "prefix_projection", encoder_hidden_size=encoder_hidden,
        )
    if method in ("p_tuning_mlp", "p_tuning_lstm"):
        kind = PromptEncoderReparameterizationType.MLP if method == "p_tuning_mlp" else \
            PromptEncoderReparameterizationType.LSTM
        return PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=num_virtual_tokens, encoder_reparameterization_type=kind,
            encoder_hidden_size=encoder_hidden,
        )
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def tiny_peft_model(arch: str, method: str, task: str = "causal_lm", *, gqa: bool = False, seed: int = 0,
                    num_virtual_tokens: int = 5, **config_kwargs: Any) -> Any:
    """``tiny_model`` wrapped by PEFT with a freshly initialised ``method`` adapter."""
    model = tiny_model(arch, task, gqa=gqa, seed=seed, **config_kwargs)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, peft_config(method, task, num_virtual_tokens=num_virtual_tokens))


def random_batch(batch: int, length: int, *, padding: str | None = None, task: str = "causal_lm",
                 num_labels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels; ``padding`` ``"left"``/``"right"`` shortens rows 1.. by 1, 2, ..."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pad = min(row, length - 1) if padding else 0
        if padding == "left":
            attention_mask[row, :pad] = 0
        elif padding == "right" and pad:
            attention_mask[row, -pad:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    if task == "causal_lm":
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    elif task == "seq_cls":
        labels = torch.randint(0, num_labels, (batch,), generator=gen)
    else:
        labels = torch.randint(0, num_labels, (batch, length), generator=gen).masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def forward_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(logits, loss, grads)`` of one forward and backward; grads of every trainable parameter, by name."""
    return loss_and_grads(model, lambda m: m(**batch))


def assert_scaled_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, rounding: float = 0.0
) -> None:
    """``max |actual - expected| <= max(tol * max |expected|, 2 * rounding)``: an absolute bound relative to the
    tensor's own scale.

    No fixed floor: a gradient of size 1e-6 is held to 1e-6 * tol, so a wrong small gradient cannot pass.
    ``rounding``: the error of the same definition computed in the lower precision (measured, not assumed);
    where a gradient is a small difference of large terms, that rounding can exceed ``tol`` of its size.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, so the comparison could not fail"
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= max(tol * scale, 2 * rounding), (
        f"{what}: max abs diff {err:.3e} > {tol:.0e} * {scale:.3g} (and > twice the reference's own rounding, "
        f"{rounding:.3e})"
    )


def cache_argument(model: Any) -> str:
    """The forward argument that takes a KV cache on this transformers version (renamed in 5.24); a task model
    that names neither hands its kwargs to the backbone."""
    for candidate in (model, model.base_model):
        parameters = inspect.signature(type(candidate).forward).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
    raise ValueError(f"{type(model).__name__} takes no cache")


def method_positions(attention_mask: torch.Tensor, offset: int, arch: str) -> torch.Tensor:
    """Position ids [B, T] of the method's definition: each row numbered from its first real token (leading
    padding skipped, later tokens counted), after ``offset`` prefix positions. RoBERTa numbers from
    ``PAD + 1`` and gives padding ``PAD``. Written row by row, independently of fastprompt's code.
    """
    first = PAD + 1 if arch == "roberta" else 0
    rows = []
    for row in attention_mask.tolist():
        lead = next((i for i, real in enumerate(row) if real), len(row))
        positions = [first + offset + max(i - lead, 0) for i in range(len(row))]
        if arch == "roberta":
            positions = [p if real else PAD for p, real in zip(positions, row, strict=True)]
        rows.append(positions)
    return torch.tensor(rows, dtype=torch.long)


def reference_forward(reference: Any, batch: dict[str, torch.Tensor], arch: str) -> Any:
    """The method's definition, run on an unpatched PEFT model through transformers' own APIs only.

    Prefix methods: PEFT's encoder output reshaped to per-layer K/V and put in a ``DynamicCache`` (every
    row the same prefix), the mask widened by ``P`` ones, positions after the prefix. P-tuning / prompt
    tuning: the encoder output prepended through ``inputs_embeds``, mask and per-token labels widened,
    virtual tokens at the first ``P`` positions. Never calls PEFT's forward (which fails on some versions).
    """
    name = reference.active_adapter
    config = reference.peft_config[name]
    base = reference.get_base_model()
    count = config.num_virtual_tokens
    tokens = reference.prompt_tokens[name][:count][None].to(base.device)
    encoded = reference.prompt_encoder[name](tokens)[0].to(base.dtype)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    size = input_ids.shape[0]
    widened = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, count), mask], dim=1)
    labels = batch.get("labels")
    if config.peft_type.value == "PREFIX_TUNING":
        heads = config.num_attention_heads
        kv = encoded.view(count, config.num_layers, 2, heads, config.token_dim // heads).permute(1, 2, 3, 0, 4)
        cache = DynamicCache(config=base.config)
        for layer in range(config.num_layers):
            cache.update(kv[layer, 0][None].expand(size, -1, -1, -1), kv[layer, 1][None].expand(size, -1, -1, -1),
                         layer)
        given = batch.get("position_ids")  # the row's own numbering: shifted by the prefix
        positions = method_positions(mask, count, arch) if given is None else given + count
        return base(input_ids=input_ids, attention_mask=widened, labels=labels,
                    position_ids=positions.to(base.device), **{cache_argument(base): cache})
    first = PAD + 1 if arch == "roberta" else 0
    virtual_positions = torch.arange(first, first + count).expand(size, -1)
    positions = torch.cat([virtual_positions, method_positions(mask, count, arch)], dim=1).to(base.device)
    if labels is not None and labels.dim() == 2:
        labels = torch.cat([torch.full_like(labels[:, :1], -100).expand(-1, count), labels], dim=1)
    embeds = torch.cat([encoded[None].expand(size, -1, -1), base.get_input_embeddings()(input_ids)], dim=1)
    return base(inputs_embeds=embeds, attention_mask=widened, labels=labels, position_ids=positions, use_cache=False)


def loss_and_grads(model: Any, run: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(logits, loss, grads)`` of ``run(model)`` and its backward; grads of every trainable parameter, by name."""
    model.zero_grad(set_to_none=True)
    out = run(model)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads
