"""fastprompt.patch(peft_model) gives unpatched PEFT's numbers (logits, loss, every trainable gradient) wherever
PEFT runs and computes the method's definition, for every tested architecture, prompt-learning method and
task. Both sides run the same model object (patched after the PEFT reference is taken). The definition
itself, including where PEFT is not a reference, is checked in tests/test_model_oracle.py and
tests/test_generate_oracle.py. Where PEFT is excluded here, and why:

- left padding: PEFT numbers a left-padded row's tokens from its first (padding) column, so the row's
  results depend on its padding; fastprompt numbers each row from its first real token (padding-invariant),
  so only right-padded batches are compared;
- prefix tuning / P-tuning v2 for sequence and token classification (BERT, RoBERTa, and the decoders'
  classifiers) when the backbones' forward names no ``past_key_values`` (transformers >= 5.24, which
  renamed it ``cache``): PEFT introspects that name and raises "Model does not support past key values";
- token classification with P-tuning / prompt tuning: PEFT does not widen the labels by the virtual
  tokens and fails on every version;
- ``generate``: on transformers >= 5.24 PEFT's prefix-tuning generate disagrees with its own forward, and
  its P-tuning / prompt-tuning generate is not padding-invariant.

Tolerances (max abs difference relative to each reference tensor's own largest value, with no floor, see
``assert_scaled_close``; gradients pass through the whole backward, so their float32 summation-order noise
relative to a small gradient's own scale reaches ~1.5e-5):

| dtype | logits / loss | gradients |
|---|---|---|
| float32 | 1e-5 | 1e-4 |
| bfloat16 | 3e-2 | 1e-1 (gradients summed over batch and positions in bf16 on both sides) |
"""

from __future__ import annotations

import inspect

import pytest
import torch
from models import (
    DECODERS,
    ENCODERS,
    METHODS,
    assert_scaled_close,
    forward_and_grads,
    random_batch,
    tiny_peft_model,
)
from transformers import BertModel, GPT2Model, LlamaModel

import fastprompt

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (3e-2, 1e-1)}
PREFIX_METHODS = ("prefix_projection", "prefix")
GQA = ("llama", "qwen3", "mistral")  # the others run plain multi-head attention
# PEFT's prefix tuning for classifiers looks for ``past_key_values`` in the backbone's forward signature
PEFT_RUNS_CLASSIFIER_PREFIXES = all(
    "past_key_values" in inspect.signature(cls.forward).parameters for cls in (BertModel, GPT2Model, LlamaModel)
)


def _peft_runs(method: str) -> bool:
    """Whether PEFT runs ``method`` on a sequence / token classifier here (module docstring)."""
    return method not in PREFIX_METHODS or PEFT_RUNS_CLASSIFIER_PREFIXES


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
    """A right-padded batch and an unpadded one (PEFT's positions for left padding differ; module docstring)."""
    return [
        {k: v.to(device) for k, v in random_batch(3, 7, padding=padding, task=task, seed=seed).items()}
        for padding in ("right", None)
    ]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_causal_lm_matches_peft(arch, method, device, seed):
    model = tiny_peft_model(arch, method, "causal_lm", gqa=arch in GQA, seed=seed).to(device).train()
    _compare(model, _batches("causal_lm", device, seed))


# P-tuning v2 (``prefix``) on BERT/RoBERTa with the [CLS] head is the paper's setting. Cases PEFT does not run
# here are left out of the list (module docstring), not skipped: token classification is compared for the
# prefix methods only, which PEFT runs on no classifier on transformers >= 5.24, so it has no case there.
CLASSIFIER_CASES = [
    *(("seq_cls", arch, method) for arch in (*ENCODERS, "llama", "gpt2") for method in METHODS),
    *(("token_cls", arch, method) for arch in (*ENCODERS, "llama", "qwen2", "gpt2") for method in PREFIX_METHODS),
]


@pytest.mark.parametrize(("task", "arch", "method"), [case for case in CLASSIFIER_CASES if _peft_runs(case[2])])
def test_classifier_matches_peft(task, arch, method, device, seed):
    model = tiny_peft_model(arch, method, task, gqa=arch in GQA, seed=seed).to(device).train()
    _compare(model, _batches(task, device, seed))


def test_bfloat16_matches_peft(device, seed):
    """bf16 weights and activations on both sides; tolerance in the module docstring."""
    model = tiny_peft_model("llama", "prefix_projection", "causal_lm", gqa=True, seed=seed).to(device, torch.bfloat16)
    _compare(model.train(), _batches("causal_lm", device, seed), dtype=torch.bfloat16)


def test_triton_backend_on_tiny_model(monkeypatch, seed):
    """The triton kernels inside a whole model (under TRITON_INTERPRET=1 on a machine without CUDA)."""
    if not fastprompt.available_backends("cuda" if torch.cuda.is_available() else "cpu")["triton"][0]:
        pytest.skip("triton cannot run here (not installed, or no CUDA and no TRITON_INTERPRET=1)")
    monkeypatch.setenv("FASTPROMPT_BACKEND", "triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_peft_model("llama", "prefix_projection", "causal_lm", gqa=True, hidden=16, heads=2, seed=seed)
    batch = {k: v.to(device) for k, v in random_batch(2, 4, padding="right", seed=seed).items()}
    _compare(model.to(device).train(), [batch])
