"""bench_train's cases build the adapters the issue names, and both sides of the table do the same work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_train  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt import bench  # noqa: E402

TINY = dict(
    decoder=bench.ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, vocab=64),
    encoder=bench_train.EncoderShape(hidden=32, layers=2, heads=4, vocab=64),
)
EXPECTED = {
    "prefix-tuning": ("PREFIX_TUNING", True, "CAUSAL_LM"),
    "p-tuning-v2": ("PREFIX_TUNING", False, "CAUSAL_LM"),
    "p-tuning-lstm": ("P_TUNING", None, "CAUSAL_LM"),
    "bert-p-tuning-v2": ("PREFIX_TUNING", False, "SEQ_CLS"),
}


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")


@pytest.mark.parametrize("case", bench_train.CASES)
def test_case_builds_the_named_adapter_and_patched_loss_matches(case):
    model, batch = bench_train.build_train_case(case, batch=2, seq_len=6, prefix_len=3, device="cpu",
                                                dtype=torch.float32, **TINY)
    config = model.active_peft_config
    peft_type, projection, task = EXPECTED[case]
    assert (config.peft_type, config.task_type) == (peft_type, task)
    if projection is not None:
        assert config.prefix_projection is projection
    else:
        assert config.encoder_reparameterization_type == "LSTM"
    assert batch["input_ids"].shape == (2, 6)
    model.eval()  # the classifier keeps BERT's dropout for the benchmark; compare without it
    with torch.no_grad():
        expected = model(**batch).loss
        fastprompt.patch(model)
        actual = model(**batch).loss
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_measure_run_times_both_sides_and_leaves_the_model_unpatched(monkeypatch):
    built = []
    real_build = bench_train.build_train_case

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(bench_train, "build_train_case", build)
    run = bench_train.Run("prefix-tuning", 2, 6, 3)
    peft, fast = bench_train.measure_run(run, device=torch.device("cpu"), dtype=torch.float32, iters=1, warmup=0,
                                         rounds=1, **TINY)
    assert peft.ms > 0 and fast.ms > 0 and peft.peak_mib > 0 and fast.peak_mib > 0
    assert "_fastprompt_patch_state" not in built[0][0].__dict__


def test_unknown_case_is_refused():
    with pytest.raises(ValueError, match="case must be one of"):
        bench_train.build_train_case("lora", batch=1, seq_len=4, prefix_len=2, device="cpu", dtype=torch.float32,
                                     **TINY)
