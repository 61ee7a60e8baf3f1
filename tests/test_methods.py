"""The method table: each prompt-learning method declared once, and one path for every adapter.

- every method declares what it reads, produces and how it trains, and PEFT's types map onto it one to one;
- no module outside ``fastprompt/methods`` names PEFT's adapter types or reads a config's type;
- a PeftModel's active adapter and the same adapter named on every row run the same code and give the same
  outputs, in ``forward`` and in ``generate``;
- an adapter made for another model is refused by its method, naming the dimension, as both an
  ``UnsupportedModelError`` and a ``ValueError``.
"""

from __future__ import annotations

import copy
import gc
import re
import weakref
from pathlib import Path

import pytest
import torch
from models import METHODS as TEST_METHODS
from models import PAD, assert_scaled_close, peft_config, random_batch, tiny_model, tiny_peft_model
from peft import LoraConfig, get_peft_model

import fastprompt
from fastprompt.hf.state import adapter_registry
from fastprompt.methods import METHODS, AdapterFitError, ModelFit, Output, Training, method_named
from fastprompt.methods.peft_format import is_prompt_learning, method_of

pytestmark = pytest.mark.hf

PACKAGE = Path(fastprompt.__file__).parent
B, T, P = 3, 6, 4


def test_every_method_declares_what_it_produces_and_how_it_trains():
    names = [method.name for method in METHODS]
    assert len(set(names)) == len(names), "two methods share a name"
    peft_types = [method.peft_type for method in METHODS if method.peft_type is not None]
    assert len(set(peft_types)) == len(peft_types), "two methods claim one PEFT type"
    for method in METHODS:
        assert isinstance(method.output, Output) and isinstance(method.training, Training), method
        assert method_named(method.name) is method
    with pytest.raises(ValueError, match="no prompt-learning method is named 'lora'"):
        method_named("lora")


@pytest.mark.parametrize(
    ("test_method", "name", "output", "training"),
    [
        ("prefix_projection", "prefix_tuning", Output.KV, Training.PREFIX),
        ("prefix", "prefix_tuning", Output.KV, Training.PREFIX),
        ("p_tuning_mlp", "p_tuning", Output.EMBEDDINGS, Training.PREPEND),
        ("p_tuning_lstm", "p_tuning", Output.EMBEDDINGS, Training.PREPEND),
        ("prompt_tuning", "prompt_tuning", Output.EMBEDDINGS, Training.PREPEND),
    ],
)
def test_peft_configs_map_to_their_method(test_method, name, output, training):
    config = peft_config(test_method, "causal_lm")
    method = method_of(config)
    assert (method.name, method.output, method.training) == (name, output, training)
    assert is_prompt_learning(config)
    assert method.length(config) == config.num_virtual_tokens


def test_other_peft_types_are_refused_naming_the_type():
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    assert not is_prompt_learning(config)
    with pytest.raises(fastprompt.UnsupportedModelError, match=r"my adapter is LORA; me takes prompt-learning"):
        method_of(config, "my adapter", "me")


def test_only_the_method_table_names_peft_adapter_types():
    pattern = re.compile(r"PREFIX_TUNING|P_TUNING|PROMPT_TUNING|peft_type")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.parent.name != "methods"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"modules outside fastprompt/methods branch on PEFT's adapter types: {offenders}"


@pytest.mark.parametrize("test_method", TEST_METHODS)
def test_active_adapter_is_every_row_naming_it(test_method, seed):
    """Without adapter_names a PeftModel runs its active adapter on every row through the registry."""
    model = fastprompt.patch(tiny_peft_model("llama", test_method, gqa=True, num_virtual_tokens=P, seed=seed)).eval()
    batch = random_batch(B, T, padding="left", seed=seed)
    with torch.no_grad():
        active = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD,
                                output_logits=True, return_dict_in_generate=True)
        named = model.generate(**batch, adapter_names=["default"] * B, max_new_tokens=3, min_new_tokens=3,
                               do_sample=False, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(active.sequences, named.sequences)
    assert_scaled_close(torch.stack(active.logits), torch.stack(named.logits), 1e-6, "generate logits")
    if method_of(model.active_peft_config).training is Training.PREFIX:
        with torch.no_grad():
            forward = model(**batch).logits
            by_name = model(**batch, adapter_names=["default"] * B).logits
        assert_scaled_close(forward, by_name, 1e-6, "forward logits")
    assert "default" in adapter_registry(model).names()


def test_one_prefix_for_every_row_is_one_bank_row_without_an_index(seed):
    model = fastprompt.patch(tiny_model("llama", gqa=True, seed=seed).eval())
    fastprompt.cache_prompt(model, "a", torch.randint(4, 90, (1, 7)))
    fastprompt.cache_prompt(model, "b", torch.randint(4, 90, (1, 3)))
    registry = adapter_registry(model)
    same = registry.batch(["a"] * B, B)
    assert same.prefix.prefix_index is None and same.prefix.bank.shape[2] == 1 and not same.rows_differ
    assert same.prefix.bank.untyped_storage().data_ptr() == registry.kv("a").untyped_storage().data_ptr()
    assert same.offsets.tolist() == [7] * B
    mixed = registry.batch(["a", "__base__", "b"], B)
    assert mixed.rows_differ and mixed.offsets.tolist() == [7, 0, 3]


@pytest.mark.parametrize(
    ("test_method", "model_kwargs", "message"),
    [
        ("prefix", {"layers": 3}, r"the active adapter 'default' was made for a model with 2 layers.*layers 2 vs"),
        ("p_tuning_mlp", {"hidden": 64}, r"virtual tokens of hidden size 32 but this model's input embeddings"),
    ],
)
def test_patch_refuses_an_adapter_of_another_model_naming_the_dimension(test_method, model_kwargs, message):
    # PEFT fills an adapter's dimensions from the first model it wraps and keeps them on another
    filled = tiny_peft_model("llama", test_method, gqa=True).peft_config["default"]
    other = get_peft_model(tiny_model("llama", **{"gqa": True, **model_kwargs}), copy.deepcopy(filled))
    with pytest.raises(AdapterFitError, match=message) as refused:
        fastprompt.patch(other)
    assert isinstance(refused.value, fastprompt.UnsupportedModelError) and isinstance(refused.value, ValueError)


def test_a_soft_prompt_served_compiled_needs_a_causal_model():
    peft_bert = tiny_peft_model("bert", "prompt_tuning", "seq_cls")
    bert, config = peft_bert.get_base_model(), peft_bert.peft_config["default"]
    method = method_of(config)
    method.check_fits(config, ModelFit.of(bert), "x", compiled=False)
    with pytest.raises(fastprompt.UnsupportedModelError, match=r"x \(compiled to keys and values once\) needs a"):
        method.check_fits(config, ModelFit.of(bert), "x", compiled=True)


@pytest.mark.parametrize("test_method", ["prefix_projection", "p_tuning_lstm"])
def test_encoder_outputs_are_kept_by_the_patch_and_go_with_it(test_method, monkeypatch, seed):
    """Serving reruns no encoder while its parameters stay the same; the cache dies with unpatch."""
    from fastprompt.encoders import api

    runs = []
    real_run = api._run
    monkeypatch.setattr(api, "_run", lambda *args: runs.append(1) or real_run(*args))
    model = fastprompt.patch(tiny_peft_model("llama", test_method, gqa=True, num_virtual_tokens=P, seed=seed)).eval()
    batch = random_batch(B, T, padding="left", seed=seed)
    with torch.no_grad():
        for _ in range(2):
            model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert len(runs) == 1, f"the encoder ran {len(runs)} times for two generations"
    cache = weakref.ref(adapter_registry(model).encoder_cache)
    assert len(cache()) == 1
    fastprompt.unpatch(model)
    gc.collect()
    assert cache() is None, "the encoder cache outlived the patch"
