"""What fastprompt.patch does and must not do, beyond giving PEFT's numbers (tests/test_patch_equivalence.py):

- the prefix reaches attention as one read-only block: never concatenated onto K/V or into the cache,
  never copied per batch row, the prompt encoder run once per forward, no 4-D mask anywhere;
- gradient checkpointing works with prefix tuning and gives the gradients of the run without it;
- patching twice is harmless, unpatch restores the model exactly;
- unsupported models and inputs raise UnsupportedModelError saying why;
- a plain transformers model takes prefixes through the ``fastprompt_prefix`` forward kwarg;
- concurrent forwards of two patched models do not see each other's prefix.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from models import (
    PAD,
    assert_scaled_close,
    forward_and_grads,
    peft_config,
    random_batch,
    reference_forward,
    tiny_config,
    tiny_model,
    tiny_peft_model,
)
from peft import LoraConfig, get_peft_model
from transformers import AttentionInterface, BloomConfig, BloomForCausalLM, DynamicCache

import fastprompt
from fastprompt import attention
from fastprompt.hf.attention import PrefixCache
from fastprompt.hf.state import patch_state
from fastprompt.methods import base as method_base
from fastprompt.prefix.bank import KVGeometry
from fastprompt.prefix.kv import PrefixKV

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

P, B, T = 5, 3, 7


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")


def _attention_spy(monkeypatch) -> list[dict]:
    """Record what every call of the "fastprompt" attention function and of the op receives."""
    calls: list[dict] = []
    real_attention = AttentionInterface._global_mapping["fastprompt"]
    real_op = attention.prefix_attention

    def spy_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({"mask_dim": None if attention_mask is None else attention_mask.dim(), "k_len": key.shape[2]})
        return real_attention(module, query, key, value, attention_mask, **kwargs)

    def op(q, k, v, prefix_k, prefix_v, **kwargs):
        mask = kwargs["key_padding_mask"]
        calls[-1].update(
            prefix_shape=tuple(prefix_k.shape),
            prefix_storage=prefix_k.untyped_storage().data_ptr(),
            padding_dim=None if mask is None else mask.dim(),
        )
        return real_op(q, k, v, prefix_k, prefix_v, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "fastprompt", spy_attention)
    monkeypatch.setattr(attention, "prefix_attention", op)
    return calls


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "seq_cls")])
def test_prefix_is_one_block_no_concat_no_row_copy_no_4d_mask(arch, task, monkeypatch, seed):
    model = fastprompt.patch(
        tiny_peft_model(arch, "prefix_projection", task, gqa=arch == "llama", num_virtual_tokens=P, seed=seed)
    )
    calls = _attention_spy(monkeypatch)
    forward_and_grads(model, random_batch(B, T, padding="left", task=task, seed=seed))
    geometry = KVGeometry.from_config(model.get_base_model().config)
    kv_heads, head_dim = geometry.num_kv_heads, geometry.head_dim
    assert len(calls) == model.get_base_model().config.num_hidden_layers
    for call in calls:
        assert call["k_len"] == T, "the prefix was concatenated onto the keys"
        assert call["prefix_shape"] == (1, kv_heads, P, head_dim), "the prefix was expanded per batch row"
        assert call["mask_dim"] == 2 and call["padding_dim"] == 2, "attention received a 4-D mask"
    assert len({call["prefix_storage"] for call in calls}) == 1, "layers' prefixes are not views of one output"


@pytest.mark.parametrize("method", ["prefix_projection", "prefix", "p_tuning_mlp", "p_tuning_lstm", "prompt_tuning"])
def test_prompt_encoder_runs_once_per_forward_on_one_row(method, monkeypatch, seed):
    model = fastprompt.patch(tiny_peft_model("llama", method, num_virtual_tokens=P, seed=seed))
    token_shapes = []
    real_encode = method_base.encode_prompt

    def encode(encoder, tokens, **kwargs):
        token_shapes.append(tuple(tokens.shape))
        return real_encode(encoder, tokens, **kwargs)

    monkeypatch.setattr(method_base, "encode_prompt", encode)
    forward_and_grads(model, random_batch(B, T, seed=seed))
    assert token_shapes == [(P,)]


@pytest.mark.parametrize("method", ["prefix_projection", "p_tuning_lstm", "prompt_tuning"])
def test_peft_forward_and_generate_plumbing_is_never_called(method, monkeypatch, seed):
    """The patched model drives the base model itself: PEFT's forward, get_prompt and generation hooks,
    which break when transformers renames what they introspect, are not on its path."""
    model = fastprompt.patch(tiny_peft_model("llama", method, num_virtual_tokens=P, seed=seed))
    peft_class = type(model)

    def refuse(*args, **kwargs):
        raise AssertionError("PEFT plumbing was called")

    for name in ("forward", "get_prompt", "prepare_inputs_for_generation", "generate"):
        for cls in peft_class.__mro__:
            if name in cls.__dict__ and cls.__module__.startswith("peft"):
                monkeypatch.setattr(cls, name, refuse)
    forward_and_grads(model, random_batch(B, T, padding="left", seed=seed))
    batch = random_batch(B, T, padding="left", seed=seed)
    with torch.no_grad():
        model.eval().generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=2, do_sample=False, pad_token_id=PAD)


def test_caller_position_ids_are_the_rows_own_numbering_shifted_by_the_prefix(seed):
    """Explicit position_ids replace the numbering taken from the mask and are shifted by the prefix length
    (as PEFT 0.21 does for prefix tuning; older PEFT used them unshifted)."""
    model = tiny_peft_model("llama", "prefix", num_virtual_tokens=P, seed=seed).eval()
    reference = copy.deepcopy(model).double()
    batch = random_batch(B, T, seed=seed)
    batch["position_ids"] = torch.arange(4, 4 + T)[None].expand(B, -1)
    fastprompt.patch(model)
    with torch.no_grad():
        expected = reference_forward(reference, batch, "llama").logits
        actual = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        default = model(input_ids=batch["input_ids"]).logits
    assert_scaled_close(actual, expected, 1e-5, "logits")
    assert (actual - default).abs().max() > 1e-3, "the caller's position_ids were ignored"


def test_cache_holds_the_sequence_but_never_the_prefix(seed):
    model = tiny_peft_model("llama", "prefix_projection", gqa=True, num_virtual_tokens=P, seed=seed)
    model = fastprompt.patch(model).eval()
    batch = random_batch(B, T, padding="left", seed=seed)
    layers = model.get_base_model().config.num_hidden_layers
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=PAD,
            return_dict_in_generate=True,
        )
    for cache, stored, counted in ((out.past_key_values, T, P + T), (generated.past_key_values, T + 3, T + 3)):
        assert isinstance(cache, PrefixCache)
        assert [DynamicCache.get_seq_length(cache, i) for i in range(layers)] == [stored] * layers
        # a forward's cache counts the prefix, as PEFT's does; generate passes positions and counts tokens only
        assert cache.get_seq_length() == counted


@pytest.mark.parametrize("method", ["p_tuning_lstm", "prompt_tuning"])
def test_generate_runs_virtual_tokens_once_as_a_prefix_block(method, monkeypatch, seed):
    """P-tuning / prompt tuning at serve time: the virtual tokens' K/V are computed once, batch 1."""
    model = fastprompt.patch(tiny_peft_model("qwen3", method, gqa=True, num_virtual_tokens=P, seed=seed)).eval()
    calls = _attention_spy(monkeypatch)
    batch = random_batch(B, T, padding="left", seed=seed)
    layers = model.get_base_model().config.num_hidden_layers
    with torch.no_grad():
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=PAD,
            return_dict_in_generate=True,
        )
    virtual_run, prefill = calls[:layers], calls[layers : 2 * layers]
    assert all(call["k_len"] == P and call["prefix_shape"][2] == 0 for call in virtual_run)
    assert all(call["k_len"] == T and call["prefix_shape"][:3] == (1, 2, P) for call in prefill)
    cache = generated.past_key_values
    assert isinstance(cache, PrefixCache) and cache.get_seq_length() == T + 2


@pytest.mark.parametrize(
    ("arch", "task", "method"),
    [
        ("llama", "causal_lm", "prefix_projection"),
        ("gpt2", "causal_lm", "prefix"),
        ("bert", "seq_cls", "prefix"),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(arch, task, method, seed):
    """Against the patched model without checkpointing (PEFT cannot run prefix tuning on BERT on every
    transformers version)."""
    model = tiny_peft_model(arch, method, task, gqa=arch == "llama", num_virtual_tokens=P, seed=seed)
    model = fastprompt.patch(model).train()
    batch = random_batch(B, T, padding="right", task=task, seed=seed)
    expected = forward_and_grads(model, batch)
    model.gradient_checkpointing_enable()
    assert model.get_base_model().is_gradient_checkpointing
    logits, loss, grads = forward_and_grads(model, batch)
    assert_scaled_close(logits, expected[0], 1e-5, "logits")
    assert_scaled_close(loss, expected[1], 1e-5, "loss")
    for name, grad in grads.items():
        assert_scaled_close(grad, expected[2][name], 1e-4, f"grad of {name}")


def test_peft_refuses_checkpointing_that_patch_allows():
    base = tiny_model("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        get_peft_model(base, peft_config("prefix", "causal_lm"))


def test_reentrant_checkpointing_is_refused_with_the_fix():
    model = fastprompt.patch(tiny_peft_model("llama", "prefix", num_virtual_tokens=P)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant': False"):
        model(**random_batch(B, T))


def test_unpatch_restores_exactly_and_patch_twice_is_harmless(seed):
    model = tiny_peft_model("qwen2", "prefix_projection", gqa=True, num_virtual_tokens=P, seed=seed).eval()
    # PEFT's positions are the definition's with right padding
    batch = random_batch(B, T, padding="right", seed=seed)
    with torch.no_grad():
        never_patched = model(**batch).logits
    instance_attrs = dict(model.__dict__)
    base_attrs = dict(model.get_base_model().__dict__)
    assert fastprompt.patch(model) is model
    state = patch_state(model)
    forward = model.forward
    assert fastprompt.patch(model) is model
    assert patch_state(model) is state and model.forward is forward
    assert model.get_base_model().config._attn_implementation == "fastprompt"
    with torch.no_grad():
        patched = model(**batch).logits
    assert_scaled_close(patched, never_patched, 1e-5, "patched logits")
    assert fastprompt.unpatch(model) is model
    assert fastprompt.unpatch(model) is model
    assert model.__dict__ == instance_attrs
    assert model.get_base_model().__dict__.keys() == base_attrs.keys()
    assert model.get_base_model().config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, never_patched)


def test_plain_model_patch_and_unpatch(seed):
    model = tiny_model("mistral", gqa=True, seed=seed).eval()
    batch = random_batch(B, T, padding="right", seed=seed)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fastprompt.patch(model)
        assert model.config._attn_implementation == "fastprompt"
        actual = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fastprompt.unpatch(model)
        assert model.config._attn_implementation == "sdpa"
    real = batch["attention_mask"].bool()
    assert_scaled_close(actual[real], expected[real], 1e-5, "logits")


def test_plain_model_takes_a_prefix_bank_through_the_forward_kwarg(seed):
    """Rows pick different bank rows; each equals the unpatched model with that prefix in its KV cache."""
    model = tiny_model("llama", gqa=True, seed=seed).eval()
    config = model.config
    geometry = KVGeometry.from_config(config)
    layers, kv_heads, head_dim = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
    bank = torch.randn(layers, 2, 2, kv_heads, P, head_dim)
    prefix_index = torch.tensor([1, 0, 1], dtype=torch.int32)
    batch = random_batch(B, T, padding="left", seed=seed)
    with torch.no_grad():
        expected = []
        for row in range(B):
            cache = DynamicCache(config=config)
            for layer in range(layers):
                block = bank[layer, :, prefix_index[row]]
                cache.update(block[0][None], block[1][None], layer)
            mask = torch.cat([torch.ones(1, P, dtype=torch.long), batch["attention_mask"][row : row + 1]], dim=1)
            expected.append(
                model(input_ids=batch["input_ids"][row : row + 1], attention_mask=mask, past_key_values=cache).logits
            )
        fastprompt.patch(model)
        prefix = PrefixKV(bank, prefix_index=prefix_index)
        actual = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            past_key_values=PrefixCache(prefix, store=False),
            fastprompt_prefix=prefix,
        ).logits
    assert_scaled_close(actual, torch.cat(expected), 1e-5, "logits")


def test_concurrent_forwards_of_two_models_stay_separate(seed):
    models = [fastprompt.patch(tiny_peft_model("llama", "prefix_projection", seed=s)).eval() for s in (0, 7)]
    batch = random_batch(B, T, padding="left", seed=seed)
    with torch.no_grad():
        expected = [m(**batch).logits for m in models]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(8):
                results[i].append(models[i](**batch).logits)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in (0, 1):
        assert len(results[i]) == 8
        for logits in results[i]:
            assert torch.equal(logits, expected[i])


def test_unsupported_models_raise_with_the_reason():
    with pytest.raises(fastprompt.UnsupportedModelError, match="PreTrainedModel or a peft PeftModel"):
        fastprompt.patch(torch.nn.Linear(2, 2))
    bloom = BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(fastprompt.UnsupportedModelError, match="does not dispatch its attention"):
        fastprompt.patch(bloom)
    sliding = tiny_model("mistral", sliding_window=16)
    with pytest.raises(fastprompt.UnsupportedModelError, match="sliding-window attention"):
        fastprompt.patch(sliding)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(fastprompt.UnsupportedModelError, match="is LORA"):
        fastprompt.patch(lora)
    assert patch_state(lora) is None


def test_inputs_the_op_cannot_express_raise():
    model = fastprompt.patch(tiny_model("llama")).eval()
    input_ids = random_batch(1, 6)["input_ids"]
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(fastprompt.UnsupportedModelError, match="packed sequences"):
        model(input_ids=input_ids, position_ids=packed_positions, use_cache=False)
    mask_4d = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(fastprompt.UnsupportedModelError, match="4-D attention mask"):
        model(input_ids=input_ids, attention_mask=mask_4d)


def test_prefix_bank_shape_is_checked():
    with pytest.raises(ValueError, match=r"bank must be \[layers, 2, N, Hkv, P, D\]"):
        PrefixKV(torch.randn(2, 3, 1, 2, 5, 8))
    config = tiny_config("llama")
    geometry = KVGeometry.from_config(config)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (2, 4, 8)


def test_prefix_bank_index_values_are_checked_once_at_construction():
    bank = torch.randn(2, 2, 3, 2, 5, 8)
    with pytest.raises(ValueError, match=r"prefix_index values must be in \[-1, N\) with N = 3"):
        PrefixKV(bank, prefix_index=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"prefix_lens values must be in \[0, P\] with P = 5"):
        PrefixKV(bank, prefix_index=torch.tensor([0, -1]), prefix_lens=torch.tensor([5, 6, 1]))


def test_eval_forward_returns_the_cache_peft_returns(seed):
    model = tiny_peft_model("llama", "prefix_projection", num_virtual_tokens=P, seed=seed).eval()
    batch = random_batch(B, T, seed=seed)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).past_key_values
        fastprompt.patch(model)
        cache = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).past_key_values
    assert cache.get_seq_length() == expected.get_seq_length() == P + T
    assert cache.layers[0].keys.shape[2] == T, "the sequence is stored, the prefix is not"


@pytest.mark.parametrize(
    ("prefix_index", "prefix_lens"), [([0, -1], None), ([0, 1], [5, 3])], ids=["row-without-prefix", "short-prefix"]
)
def test_prefix_cache_refuses_banks_whose_rows_need_their_own_positions(prefix_index, prefix_lens):
    bank = torch.randn(2, 2, 2, 2, 5, 8)
    lens = None if prefix_lens is None else torch.tensor(prefix_lens)
    prefix = PrefixKV(bank, prefix_index=torch.tensor(prefix_index), prefix_lens=lens)
    with pytest.raises(ValueError, match="passing position_ids"):
        PrefixCache(prefix, store=False)
    assert PrefixCache(prefix, store=False, count_prefix=False).get_seq_length() == 0


def test_layers_that_drop_the_prefix_kwarg_are_refused(monkeypatch, seed):
    """A model whose layers do not pass keyword arguments down would silently run without the prefix."""
    from fastprompt.hf.attention import PREFIX_KWARG

    model = fastprompt.patch(tiny_peft_model("llama", "prefix", num_virtual_tokens=P, seed=seed))
    real_attention = AttentionInterface._global_mapping["fastprompt"]

    def attention_of_layer_one_loses_kwargs(module, *args, **kwargs):
        if module.layer_idx == 1:
            kwargs.pop(PREFIX_KWARG)
        return real_attention(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "fastprompt", attention_of_layer_one_loses_kwargs)
    with pytest.raises(
        fastprompt.UnsupportedModelError, match=r"did not hand the prefix to the attention of layers \[1\]"
    ):
        model(**random_batch(B, T, seed=seed))
