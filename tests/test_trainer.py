"""The ``transformers`` ``Trainer`` with a patched model, for every prompt-learning method: it trains,
evaluates every step, saves PEFT-format checkpoints (``save_total_limit``), ``load_best_model_at_end=True``
leaves it holding a model with the logits of the best checkpoint loaded fresh (``PeftModel.from_pretrained``
on a fresh base, then patched), and a run resumed from a checkpoint ends where the uninterrupted run ends.

``fastprompt.patch`` turns on :func:`fastprompt.hf.checkpoints.enable_encoder_checkpoints` (and ``unpatch`` turns
it off again); without it PEFT's checkpoints fail the last two for prefix tuning with projection (loading
raises) and P-tuning (other logits; see that module).
"""

from __future__ import annotations

import os

import pytest
import torch
from models import METHODS, assert_scaled_close, random_batch, tiny_model, tiny_peft_model
from peft import PeftModel
from transformers import Trainer, TrainingArguments

import fastprompt
from fastprompt.hf.checkpoints import ENCODER_FILE, disable_encoder_checkpoints, enable_encoder_checkpoints

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

TRAIN_ROWS, EVAL_ROWS, LENGTH, BATCH = 8, 4, 10, 2
# fp32, same kernels on both sides: only the prompt encoder's fused path (the Trainer's model) against
# PEFT's saved output of its own encoder (the fresh model) differ, by rounding
LOGITS_TOL = 1e-5


def _rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{key: value[i] for key, value in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _patched(method: str, seed: int) -> PeftModel:
    return fastprompt.patch(tiny_peft_model("llama", method, gqa=True, seed=seed))


def _trainer(model: PeftModel, output_dir: str, max_steps: int, **overrides) -> Trainer:
    args = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        learning_rate=0.05, lr_scheduler_type="constant", eval_strategy="steps", eval_steps=1, save_strategy="steps",
        save_steps=1, save_total_limit=2, load_best_model_at_end=True, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0,
    )
    args.update(overrides)
    return Trainer(
        model=model, args=TrainingArguments(**args), train_dataset=_rows(random_batch(TRAIN_ROWS, LENGTH, seed=1)),
        eval_dataset=_rows(random_batch(EVAL_ROWS, LENGTH, seed=2)),
    )


def _logits(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _trainable(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_trainer_trains_saves_loads_best_and_resumes(method, tmp_path, seed):
    model = _patched(method, seed)
    initial = _trainable(model)
    trainer = _trainer(model, str(tmp_path / "run"), max_steps=3)
    trainer.train()

    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 3, f"expected an evaluation after each of 3 steps, got {evals}"
    assert any(not torch.equal(initial[name], p) for name, p in _trainable(model).items()), "nothing trained"
    best = trainer.state.best_model_checkpoint
    checkpoints = sorted(os.listdir(tmp_path / "run"))
    assert len(checkpoints) <= 2 and os.path.basename(best) in checkpoints, checkpoints
    for name in ("adapter_config.json", "adapter_model.safetensors", ENCODER_FILE):
        assert os.path.isfile(os.path.join(best, name)), f"{best} has no {name}"

    batch = random_batch(3, LENGTH, padding="left", seed=3)
    fresh = fastprompt.patch(PeftModel.from_pretrained(tiny_model("llama", gqa=True, seed=seed), best))
    expected = _logits(fresh, batch)
    assert_scaled_close(_logits(trainer.model, batch), expected, LOGITS_TOL, f"{method}: best model's logits")
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-5)

    # resume from the last checkpoint (kept by the rotation) and go on to step 5; compare with 5 steps straight
    last = max(checkpoints, key=lambda name: int(name.split("-")[1]))
    resumed_model = _patched(method, seed)
    _trainer(resumed_model, str(tmp_path / "run"), max_steps=5, load_best_model_at_end=False).train(
        resume_from_checkpoint=str(tmp_path / "run" / last)
    )
    straight_model = _patched(method, seed)
    _trainer(straight_model, str(tmp_path / "straight"), max_steps=5, load_best_model_at_end=False,
             save_strategy="no").train()
    straight = _trainable(straight_model)
    for name, value in _trainable(resumed_model).items():
        assert_scaled_close(value - initial[name], straight[name] - initial[name], 1e-5, f"{method}: resumed {name}")


def test_without_encoder_checkpoints_peft_cannot_reload_a_p_tuning_checkpoint(tmp_path, seed):
    """What the workaround is for: PEFT's load_adapter feeds the saved encoder output back through the encoder."""
    model = disable_encoder_checkpoints(_patched("p_tuning_mlp", seed))
    model.save_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / ENCODER_FILE)
    batch = random_batch(2, LENGTH, seed=seed)
    before = _logits(model, batch)
    model.load_adapter(str(tmp_path), "default")
    assert not torch.allclose(_logits(model, batch), before, atol=1e-3), "PEFT's reload now keeps the logits"


def test_patch_turns_encoder_checkpoints_on_and_unpatch_restores_what_was_there(seed):
    plain = tiny_peft_model("llama", "p_tuning_mlp", gqa=True, seed=seed)
    before = dict(plain.__dict__)
    fastprompt.patch(plain)
    assert "save_pretrained" in plain.__dict__ and "load_adapter" in plain.__dict__
    fastprompt.unpatch(plain)
    assert plain.__dict__ == before

    enabled = enable_encoder_checkpoints(tiny_peft_model("llama", "p_tuning_mlp", gqa=True, seed=seed))
    assert enable_encoder_checkpoints(enabled) is enabled
    before = dict(enabled.__dict__)
    fastprompt.unpatch(fastprompt.patch(enabled))
    assert enabled.__dict__ == before, "unpatch turned off checkpoints that were on before patch"


def test_enable_encoder_checkpoints_refuses_a_model_that_is_not_peft():
    with pytest.raises(TypeError, match="takes a peft.PeftModel, got LlamaForCausalLM"):
        enable_encoder_checkpoints(tiny_model("llama"))
