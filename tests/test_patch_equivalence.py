"""fastprompt.patch(peft_model) gives unpatched PEFT's numbers: logits, loss, every trainable gradient and
greedy generations, for every tested architecture, prompt-learning method and task, with left and right
padding. Both sides run the same model object (patched after the PEFT reference is taken).

Tolerances (max abs difference relative to each reference tensor's own largest value, with no floor, see
``assert_scaled_close``; gradients pass through the whole backward, so their float32 summation-order noise
relative to a small gradient's own scale reaches ~1.5e-5):

| dtype | logits / loss | gradients |
|---|---|---|
| float32 | 1e-5 | 1e-4 |
| bfloat16 | 3e-2 | 1e-1 (gradients summed over batch and positions in bf16 on both sides) |
"""

from __future__ import annotations

import pytest
import torch
from models import (
    DECODERS,
    ENCODERS,
    METHODS,
    PAD,
    assert_scaled_close,
    forward_and_grads,
    random_batch,
    tiny_peft_model,
)

import fastprompt

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (3e-2, 1e-1)}
PREFIX_METHODS = ("prefix_projection", "prefix")
GQA = ("llama", "qwen3", "mistral")  # the others run plain multi-head attention


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def device(request, monkeypatch) -> torch.device:
    """Every model test runs on CPU with the C++ backend, and on CUDA (triton) where there is a GPU."""
    backend = "cpu" if request.param == "cpu" else "triton"
    if backend == "cpu" and not fastprompt.available_backends("cpu")["cpu"][0]:
        backend = "torch"  # the C++ kernels need a compiler; tests/test_cpp_build.py reports why
    monkeypatch.setenv("FASTPROMPT_BACKEND", backend)
    return torch.device(request.param)


def _compare(model, batches, dtype=torch.float32) -> None:
    """Run each batch on the unpatched model, patch, run again, compare; leaves the model patched."""
    expected = [forward_and_grads(model, batch) for batch in batches]
    fastprompt.patch(model)
    logit_tol, grad_tol = TOL[dtype]
    for batch, (ref_logits, ref_loss, ref_grads) in zip(batches, expected, strict=True):
        logits, loss, grads = forward_and_grads(model, batch)
        assert_scaled_close(logits, ref_logits, logit_tol, "logits")
        assert_scaled_close(loss, ref_loss, logit_tol, "loss")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert_scaled_close(grads[name], ref_grads[name], grad_tol, f"grad of {name}")


def _batches(task: str, device: torch.device, seed: int) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.to(device) for k, v in random_batch(3, 7, padding=padding, task=task, seed=seed).items()}
        for padding in ("left", "right")
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_causal_lm_matches_peft(arch, method, device):
    torch.manual_seed(0)
    model = tiny_peft_model(arch, method, "causal_lm", gqa=arch in GQA).to(device).train()
    _compare(model, _batches("causal_lm", device, seed=1))


@pytest.mark.parametrize(("arch", "method"), [
    *[(arch, method) for arch in ENCODERS for method in METHODS],
    *[(arch, method) for arch in ("llama", "gpt2") for method in METHODS],
])
def test_sequence_classification_matches_peft(arch, method, device):
    """P-tuning v2 (``prefix``) on BERT/RoBERTa with the [CLS] head is the paper's setting."""
    torch.manual_seed(0)
    model = tiny_peft_model(arch, method, "seq_cls", gqa=arch in GQA).to(device).train()
    _compare(model, _batches("seq_cls", device, seed=2))


# PEFT itself fails token classification with P-tuning / prompt tuning (labels are not widened by the
# virtual tokens), so only the prefix methods have a reference to compare with.
@pytest.mark.parametrize("method", PREFIX_METHODS)
@pytest.mark.parametrize("arch", ENCODERS + ("llama", "qwen2", "gpt2"))
def test_token_classification_matches_peft(arch, method, device):
    torch.manual_seed(0)
    model = tiny_peft_model(arch, method, "token_cls", gqa=arch in GQA).to(device).train()
    _compare(model, _batches("token_cls", device, seed=3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_matches_peft(arch, method, device):
    """Left-padded prompts, KV-cached decoding: identical tokens, and the same logits at every step."""
    torch.manual_seed(0)
    model = tiny_peft_model(arch, method, "causal_lm", gqa=arch in GQA).to(device).eval()
    batch = random_batch(3, 6, padding="left", seed=4)
    prompt = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(**prompt, **kwargs)
        fastprompt.patch(model)
        actual = model.generate(**prompt, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_scaled_close(got, want, 1e-5, f"logits of step {step}")


def test_bfloat16_matches_peft(device):
    """bf16 weights and activations on both sides; tolerance in the module docstring."""
    torch.manual_seed(0)
    model = tiny_peft_model("llama", "prefix_projection", "causal_lm", gqa=True).to(device, torch.bfloat16)
    _compare(model.train(), _batches("causal_lm", device, seed=5), dtype=torch.bfloat16)


def test_triton_backend_on_tiny_model(monkeypatch):
    """The triton kernels inside a whole model (under TRITON_INTERPRET=1 on a machine without CUDA)."""
    if not fastprompt.available_backends("cuda" if torch.cuda.is_available() else "cpu")["triton"][0]:
        pytest.skip("triton cannot run here (not installed, or no CUDA and no TRITON_INTERPRET=1)")
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tiny_peft_model("llama", "prefix_projection", "causal_lm", gqa=True, hidden=16, heads=2)
    batch = {k: v.to(device) for k, v in random_batch(2, 4, padding="left", seed=6).items()}
    _compare(model.to(device).train(), [batch])
