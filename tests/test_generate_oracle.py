"""Greedy ``generate`` on a patched PEFT model against an independent oracle, for every method on every
decoder of tests/models.py:

- unpadded batch: KV-cached decoding gives, at every step, the logits of decoding without a cache, where
  each step recomputes the whole generated sequence through the method's float64 definition
  (``reference_forward``: the prefix in a ``DynamicCache`` or the virtual tokens prepended, with the
  method's positions), never through fastprompt or PEFT;
- left-padded batch: every row gives the tokens and logits it gives alone. PEFT's own P-tuning and
  prompt-tuning ``generate`` fails this (padding shifts its virtual tokens' positions), and on
  transformers >= 5.24 its prefix-tuning ``generate`` disagrees with its forward, so PEFT's ``generate`` is
  no reference here.

Logits: 1e-5 of their scale (float32 against float64, and float32 against float32 for the rows alone).
Tokens: the greedy choice of the oracle's logits, or with fresh seeds a near-tie (a candidate within twice that
tolerance of the best), which float32 rounding may break either way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import DECODERS, METHODS, PAD, assert_scaled_close, random_batch, reference_forward, tiny_peft_model

import fastprompt

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

GQA = ("llama", "qwen3", "mistral")
LOGITS_TOL = 1e-5
EOS = 3  # tests/models.py's eos id; min_new_tokens keeps generate from choosing it, and the oracle likewise
NEW = 5
GREEDY = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=PAD, output_logits=True,
              return_dict_in_generate=True)


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")


def _choosable(logits: torch.Tensor) -> torch.Tensor:
    """What greedy decoding picks from: ``logits`` [B, V] with the EOS column masked (as min_new_tokens does)."""
    choice = logits.clone()
    choice[:, EOS] = float("-inf")
    return choice


def _recomputed_logits(reference, sequences: torch.Tensor, arch: str) -> list[torch.Tensor]:
    """Each step's next-token logits [B, V] without a cache, teacher-forced on ``sequences`` [B, T + NEW]: the
    full float64 definition recomputed for every prefix of the generated rows."""
    logits = []
    for end in range(sequences.shape[1] - NEW, sequences.shape[1]):
        ids = sequences[:, :end]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logits.append(reference_forward(reference, batch, arch).logits[:, -1].float())
    return logits


def _assert_greedy_choice(chosen: torch.Tensor, reference_logits: torch.Tensor, tol: float, what: str) -> None:
    """``chosen`` [B] is the argmax of ``reference_logits`` [B, V] wherever that is decided within ``tol`` of
    the logits' scale: a candidate within twice that of the best (a near-tie the compared model's rounding may
    break either way) is an equally right choice."""
    choice = _choosable(reference_logits)
    bound = 2 * tol * choice[torch.isfinite(choice)].abs().max().clamp(min=1.0)
    picked = choice.gather(1, chosen[:, None])[:, 0]
    assert (picked >= choice.max(-1).values - bound).all(), f"{what}: a token greedy decoding would not pick"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_cached_greedy_equals_recomputed_greedy(arch, method, seed):
    model = tiny_peft_model(arch, method, gqa=arch in GQA, seed=seed).eval()
    reference = copy.deepcopy(model).double()
    fastprompt.patch(model)
    input_ids = random_batch(3, 6, seed=seed)["input_ids"]
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **GREEDY)
        expected_logits = _recomputed_logits(reference, generated.sequences, arch)
    assert torch.equal(generated.sequences[:, : input_ids.shape[1]], input_ids)
    for step, (got, want) in enumerate(zip(generated.logits, expected_logits, strict=True)):
        assert_scaled_close(got, want, LOGITS_TOL, f"logits of step {step}")
        _assert_greedy_choice(generated.sequences[:, input_ids.shape[1] + step], want, LOGITS_TOL, f"step {step}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", DECODERS)
def test_left_padded_generation_equals_each_row_alone(arch, method, seed):
    model = fastprompt.patch(tiny_peft_model(arch, method, gqa=arch in GQA, seed=seed)).eval()
    batch = random_batch(3, 6, padding="left", seed=seed)
    with torch.no_grad():
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **GREEDY)
        for row in range(3):
            real = batch["attention_mask"][row].bool()
            alone = model.generate(input_ids=batch["input_ids"][row, real][None], **GREEDY)
            # Token for token while the choice is decided; after a near-tie the two may part, and so may
            # everything they condition on.
            for step, (got, want) in enumerate(zip(generated.logits, alone.logits, strict=True)):
                assert_scaled_close(got[row], want[0], LOGITS_TOL, f"row {row}, logits of step {step}")
                token, token_alone = generated.sequences[row, -NEW + step], alone.sequences[0, -NEW + step]
                _assert_greedy_choice(token[None], want, LOGITS_TOL, f"row {row}, step {step}")
                if token != token_alone:
                    break
