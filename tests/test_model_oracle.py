"""A patched PEFT model computes each method's definition: logits, loss and the gradient of every trainable
parameter equal an explicit float64 reference built from transformers' own APIs (``reference_forward`` in
tests/models.py: the prefix K/V in a ``DynamicCache``, or the virtual tokens prepended through
``inputs_embeds``, with the method's positions), on every architecture and task of tests/models.py, with
left and right padding. This includes the cases PEFT itself cannot run on transformers >= 5.24 (prefix
tuning / P-tuning v2 on BERT and RoBERTa) and token classification with P-tuning / prompt tuning, which
PEFT never supported (its labels are not widened by the virtual tokens).

Positions of the definition: each row numbered from its first real token, after the prefix, and padding
masked as keys, so a left-padded row equals the row run alone (tests/test_generate_oracle.py checks that
directly for generation).

Tolerances (max abs difference relative to the reference tensor's own largest value, float32 against
float64): logits and loss 1e-5, gradients 1e-4 (summation-order noise through the whole backward).
"""

from __future__ import annotations

import copy

import pytest
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

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

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
def test_forward_equals_the_method_definition(arch, task, method, seed):
    model = tiny_peft_model(arch, method, task, gqa=arch in GQA, seed=seed).train()
    reference = copy.deepcopy(model).double()
    reference32 = copy.deepcopy(model)  # the definition in the model's own dtype: how much its rounding costs
    fastprompt.patch(model)
    for offset, padding in enumerate(("left", "right")):
        batch = random_batch(3, 7, padding=padding, task=task, seed=seed + offset)
        ref_logits, ref_loss, ref_grads = loss_and_grads(
            reference, lambda m, batch=batch: reference_forward(m, batch, arch)
        )
        _, _, rounded_grads = loss_and_grads(reference32, lambda m, batch=batch: reference_forward(m, batch, arch))
        logits, loss, grads = forward_and_grads(model, batch)
        assert_scaled_close(logits, ref_logits, 1e-5, f"{padding} padding: logits")
        assert_scaled_close(loss, ref_loss, 1e-5, f"{padding} padding: loss")
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            rounding = (rounded_grads[name].double() - ref_grads[name].double()).abs().max().item()
            assert_scaled_close(grads[name], ref_grads[name], 1e-4, f"{padding} padding: grad of {name}", rounding)
