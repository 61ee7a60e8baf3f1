"""A patched PEFT model computes each method's definition: logits, loss and the gradient of every trainable
parameter equal an explicit float64 reference built from transformers' own APIs (``reference_forward`` in
tests/models.py: the prefix K/V in a ``DynamicCache``, or the virtual tokens prepended through
``inputs_embeds``, with the method's positions), on every architecture and task of tests/models.py, with
left and right padding. This includes the cases PEFT itself cannot run on transformers >= 5.24 (prefix
tuning / P-tuning v2 on BERT and RoBERTa) and token classification with P-tuning / prompt tuning, which
PEFT never supported (its labels are not widened by the virtual tokens).

Positions of the definition: each row numbered from its first real token, after the prefix, so a
left-padded row also equals the row run alone (checked on the decoders).

Tolerances (max abs difference relative to the reference tensor's own largest value, float32 against
float64): logits and loss 1e-5, gradients 1e-4 (summation-order noise through the whole backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import (
    DECODERS,
    ENCODERS,
    METHODS,
    assert_scaled_close,
    forward_and_grads,
    loss_and_grads,
    random_batch,
    reference_forward,
    tiny_peft_model,
)

import fastprompt

GQA = ("llama", "qwen3", "mistral")
CASES = [
    *[(arch, "causal_lm") for arch in DECODERS],
    *[(arch, "seq_cls") for arch in (*ENCODERS, "llama", "gpt2")],
    *[(arch, "token_cls") for arch in (*ENCODERS, "llama", "qwen2", "gpt2")],
]


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("arch", "task"), CASES)
def test_forward_equals_the_method_definition(arch, task, method):
    torch.manual_seed(0)
    model = tiny_peft_model(arch, method, task, gqa=arch in GQA).train()
    reference = copy.deepcopy(model).double()
    fastprompt.patch(model)
    for seed, padding in enumerate(("left", "right")):
        batch = random_batch(3, 7, padding=padding, task=task, seed=seed)
        ref_logits, ref_loss, ref_grads = loss_and_grads(
            reference, lambda m, batch=batch: reference_forward(m, batch, arch)
        )
        logits, loss, grads = forward_and_grads(model, batch)
        assert_scaled_close(logits, ref_logits, 1e-5, f"{padding} padding: logits")
        assert_scaled_close(loss, ref_loss, 1e-5, f"{padding} padding: loss")
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            assert_scaled_close(grads[name], ref_grads[name], 1e-4, f"{padding} padding: grad of {name}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_left_padded_row_equals_the_row_alone(arch, method):
    torch.manual_seed(0)
    model = fastprompt.patch(tiny_peft_model(arch, method, gqa=arch in GQA)).eval()
    batch = random_batch(3, 7, padding="left", seed=5)
    virtual = 0 if method.startswith("prefix") else model.active_peft_config.num_virtual_tokens
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row in range(3):
            real = batch["attention_mask"][row].bool()
            alone = model(input_ids=batch["input_ids"][row, real][None]).logits[0]
            padded = logits[row, virtual:][real]
            assert_scaled_close(padded, alone[virtual:], 1e-5, f"row {row}")
