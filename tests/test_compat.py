"""fastprompt.hf.compat answers the version-dependent questions for the installed transformers/PEFT: the KV cache
argument and output field under either name, the position rule of RoBERTa-style embeddings."""

from __future__ import annotations

import inspect

import pytest
import torch
from models import PAD, tiny_model
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from fastprompt.hf import compat

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("gpt2", "seq_cls"), ("bert", "token_cls")])
def test_cache_kwarg_is_a_name_the_model_or_its_backbone_takes(arch, task):
    model = tiny_model(arch, task)
    name = compat.cache_kwarg(model)
    assert name in ("cache", "past_key_values")
    takes = [inspect.signature(type(m).forward).parameters for m in (model, model.base_model)]
    assert any(name in parameters for parameters in takes)


def test_cache_kwarg_of_a_model_without_a_cache_is_refused():
    with pytest.raises(ValueError, match="takes no KV cache argument"):
        compat.cache_kwarg(torch.nn.Linear(2, 2))


def test_output_cache_reads_the_field_this_version_fills():
    model = tiny_model("llama").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
    keys, values = compat.cache_layer_kv(cache)[0]
    assert keys.shape[2] == values.shape[2] == 3
    assert compat.output_cache(BaseModelOutputWithPast(last_hidden_state=torch.zeros(1))) is None
    assert compat.output_cache({"past_key_values": cache}) is cache
    assert compat.output_cache({"cache": cache}) is cache


def test_position_rule():
    assert compat.position_rule(tiny_model("roberta", "seq_cls")) == (PAD + 1, PAD)
    assert compat.position_rule(tiny_model("bert", "seq_cls")) == (0, None)
    assert compat.position_rule(tiny_model("llama")) == (0, None)
