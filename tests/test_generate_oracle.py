"""Greedy ``generate`` on a patched PEFT model against an independent oracle, for every method on every
decoder of tests/models.py:

- unpadded batch: KV-cached decoding gives the tokens (and, at every step, the logits) of decoding without
  a cache, where each step recomputes the whole sequence through the method's float64 definition
  (``reference_forward``: the prefix in a ``DynamicCache`` or the virtual tokens prepended, with the
  method's positions), never through fastprompt or PEFT;
- left-padded batch: every row gives the tokens and logits it gives alone. PEFT's own P-tuning and
  prompt-tuning ``generate`` fails this (padding shifts its virtual tokens' positions), and on
  transformers >= 5.24 its prefix-tuning ``generate`` disagrees with its forward, so PEFT's ``generate`` is
  no reference here.

Logits: 1e-5 of their scale (float32 against float64, and float32 against float32 for the rows alone).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import DECODERS, METHODS, PAD, assert_scaled_close, random_batch, reference_forward, tiny_peft_model

import fastprompt

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

GQA = ("llama", "qwen3", "mistral")
EOS = 3  # tests/models.py's eos id; min_new_tokens keeps generate from choosing it, and the oracle likewise
NEW = 5
GREEDY = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=PAD, output_logits=True,
              return_dict_in_generate=True)


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")


def _recomputed_greedy(reference, input_ids: torch.Tensor, arch: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding without a cache: the full float64 definition recomputed at every step."""
    ids, step_logits = input_ids, []
    for _ in range(NEW):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logits = reference_forward(reference, batch, arch).logits[:, -1].float()
        step_logits.append(logits)
        choice = logits.clone()
        choice[:, EOS] = float("-inf")
        ids = torch.cat([ids, choice.argmax(-1, keepdim=True)], dim=1)
    return ids, step_logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_cached_greedy_equals_recomputed_greedy(arch, method):
    torch.manual_seed(0)
    model = tiny_peft_model(arch, method, gqa=arch in GQA).eval()
    reference = copy.deepcopy(model).double()
    fastprompt.patch(model)
    input_ids = random_batch(3, 6, seed=7)["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **GREEDY)
        expected, expected_logits = _recomputed_greedy(reference, input_ids, arch)
    assert torch.equal(generated.sequences, expected)
    for step, (got, want) in enumerate(zip(generated.logits, expected_logits, strict=True)):
        assert_scaled_close(got, want, 1e-5, f"logits of step {step}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_left_padded_generation_equals_each_row_alone(arch, method):
    torch.manual_seed(0)
    model = fastprompt.patch(tiny_peft_model(arch, method, gqa=arch in GQA)).eval()
    batch = random_batch(3, 6, padding="left", seed=8)
    with torch.no_grad():
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **GREEDY)
        for row in range(3):
            real = batch["attention_mask"][row].bool()
            alone = model.generate(input_ids=batch["input_ids"][row, real][None], **GREEDY)
            assert torch.equal(generated.sequences[row, -NEW:], alone.sequences[0, -NEW:]), f"row {row}"
            for step, (got, want) in enumerate(zip(generated.logits, alone.logits, strict=True)):
                assert_scaled_close(got[row], want[0], 1e-5, f"row {row}, logits of step {step}")
