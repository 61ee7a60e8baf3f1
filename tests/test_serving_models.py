"""The serving layer on models: adapters of every prompt-learning type and length, cached prompts and the base
model mixed in one left-padded batch, through ``model(..., adapter_names=...)`` and
``model.generate(..., adapter_names=...)`` of a patched plain Llama and of a patched ``PeftModel``:

- each row equals that row run alone, unpadded, through PEFT with its adapter (``PeftModel.from_pretrained``
  on the same base), or through the unpatched model with the prompt's tokens in front for a cached prompt,
  in logits and in greedy tokens;
- changing one row's adapter changes no other row;
- compiled soft prompts are computed once and recomputed when their parameters change;
- exports load back onto a model and serve the same rows;
- every bad input is refused with a message naming the problem.
"""

from __future__ import annotations

import pytest
import torch
from models import PAD, VOCAB, assert_scaled_close, peft_config, random_batch, tiny_model, tiny_peft_model
from peft import LoraConfig, PeftModel, get_peft_model

import fastprompt
from fastprompt.hf import compat
from fastprompt.hf.state import adapter_registry
from fastprompt.prefix import ExportedPrefix
from fastprompt.serving import cache_prompt, export_prefix_kv, load_adapter, load_prefix_kv

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

# name -> (PEFT method of tests/models.py, number of virtual tokens): every type, every length different
ADAPTERS = {
    "proj": ("prefix_projection", 5),
    "deep": ("prefix", 3),
    "mlp": ("p_tuning_mlp", 4),
    "lstm": ("p_tuning_lstm", 6),
    "soft": ("prompt_tuning", 7),
}
PROMPT_LEN = 8


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    ok = fastprompt.available_backends("cpu")["cpu"][0]
    monkeypatch.setenv("FASTPROMPT_BACKEND", "cpu" if ok else "torch")


def _base(arch: str = "llama", **kwargs) -> torch.nn.Module:
    return tiny_model(arch, gqa=arch == "llama", seed=0, **kwargs).eval()


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> dict[str, str]:
    """Each adapter of ADAPTERS trained-from-random on the same base and saved in PEFT's format."""
    folders = {}
    for name, (method, length) in ADAPTERS.items():
        folder = tmp_path_factory.mktemp(name)
        tiny_peft_model("llama", method, gqa=True, seed=0, num_virtual_tokens=length).save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def _prompt() -> torch.Tensor:
    return torch.randint(4, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(11))


def _serving_model(saved_adapters: dict[str, str]) -> torch.nn.Module:
    model = fastprompt.patch(_base())
    for name, folder in saved_adapters.items():
        load_adapter(model, folder, name)
    cache_prompt(model, "prompt", _prompt())
    return model


def _serve(model, names: list[str], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of a mixed batch through the patched forward's ``adapter_names``."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names,
                     use_cache=False).logits


def _alone(name: str, tokens: torch.Tensor, saved_adapters: dict[str, str], arch: str = "llama") -> torch.Tensor:
    """Logits [T, V] of one unpadded row run alone through PEFT (or the unpatched model, prompt in front)."""
    with torch.no_grad():
        if name == "__base__":
            return _base(arch)(input_ids=tokens[None]).logits[0]
        if name == "prompt":
            return _base(arch)(input_ids=torch.cat([_prompt(), tokens[None]], 1)).logits[0, PROMPT_LEN:]
        peft_model = PeftModel.from_pretrained(_base(arch), saved_adapters[name]).eval()
        logits = peft_model(input_ids=tokens[None]).logits[0]
    return logits[-tokens.shape[0] :]  # P-tuning and prompt tuning return logits of the virtual tokens too


NAMES = ["proj", "lstm", "__base__", "soft", "prompt", "deep", "mlp", "proj"]


def _assert_rows_equal_alone(model, names: list[str], batch: dict, saved_adapters) -> None:
    """Each row of the mixed batch served with ``names`` equals that row alone through PEFT (logits, 1e-5)."""
    actual = _serve(model, names, batch)
    for row, name in enumerate(names):
        real = batch["attention_mask"][row].bool()
        expected = _alone(name, batch["input_ids"][row][real], saved_adapters)
        assert_scaled_close(actual[row][real], expected, 1e-5, f"row {row} ({name})")


def test_mixed_batch_rows_equal_each_row_alone_through_peft(saved_adapters):
    torch.manual_seed(0)
    model = _serving_model(saved_adapters)
    _assert_rows_equal_alone(model, NAMES, random_batch(len(NAMES), 9, padding="left"), saved_adapters)


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_other_decoders_serve_mixed_rows(arch, tmp_path):
    """Learned absolute positions (GPT-2) and scaled input embeddings (Gemma) through the same path."""
    torch.manual_seed(0)
    folders = {}
    for name in ("deep", "lstm", "soft"):
        method, length = ADAPTERS[name]
        folders[name] = str(tmp_path / name)
        tiny_peft_model(arch, method, seed=0, num_virtual_tokens=length).save_pretrained(folders[name])
    model = fastprompt.patch(_base(arch))
    for name, folder in folders.items():
        load_adapter(model, folder, name)
    cache_prompt(model, "prompt", _prompt())
    names = ["soft", "deep", "prompt", "__base__", "lstm"]
    batch = random_batch(len(names), 6, padding="left")
    actual = _serve(model, names, batch)
    for row, name in enumerate(names):
        real = batch["attention_mask"][row].bool()
        expected = _alone(name, batch["input_ids"][row][real], folders, arch)
        assert_scaled_close(actual[row][real], expected, 1e-5, f"{arch} row {row} ({name})")


def test_changing_one_row_s_adapter_changes_no_other_row(saved_adapters):
    torch.manual_seed(0)
    model = _serving_model(saved_adapters)
    batch = random_batch(len(NAMES), 9, padding="left")
    before = _serve(model, NAMES, batch)
    for new in ("soft", "__base__", "prompt"):
        names = [*NAMES[:3], new, *NAMES[4:]]  # row 3 was the only "soft" row: the bank's rows change too
        after = _serve(model, names, batch)
        others = [row for row in range(len(NAMES)) if row != 3]
        assert torch.equal(after[others], before[others]), f"row 3 -> {new} changed another row"
        if new != NAMES[3]:
            real = batch["attention_mask"][3].bool()
            assert not torch.allclose(after[3][real], before[3][real]), f"row 3 -> {new} did not change row 3"


def test_cached_prompt_rows_equal_prepending_the_prompt_whatever_the_padding():
    torch.manual_seed(0)
    model = fastprompt.patch(_base())
    cache_prompt(model, "few-shot", _prompt())
    reference = _base()
    for padding in (None, "left", "right"):
        batch = random_batch(4, 7, padding=padding, seed=3)
        actual = _serve(model, ["few-shot"] * 4, batch)
        for row in range(4):
            real = batch["attention_mask"][row].bool()
            with torch.no_grad():
                prepended = torch.cat([_prompt()[0], batch["input_ids"][row][real]])[None]
                expected = reference(input_ids=prepended).logits[0, PROMPT_LEN:]
            assert_scaled_close(actual[row][real], expected, 1e-5, f"{padding} padding, row {row}")


def test_bank_holds_a_shared_prompt_once_for_32_rows():
    model = fastprompt.patch(_base(max_positions=1024))
    cache_prompt(model, "system", torch.randint(4, VOCAB, (1, 512), generator=torch.Generator().manual_seed(0)))
    cache_prompt(model, "other", torch.randint(4, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1)))
    registry = adapter_registry(model)
    kv = registry.kv("system")
    served = registry.batch(["system"] * 32, 32)
    bank = served.prefix.bank
    assert bank.shape[2] == 1 and bank.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    assert bank.untyped_storage().nbytes() == kv.numel() * kv.element_size(), "one prefix's bytes for 32 rows"
    assert served.offsets.tolist() == [512] * 32
    mixed = registry.batch(["system", "other"] * 16, 32).prefix
    assert mixed.bank.shape[2] == 2 and mixed.prefix_lens.tolist() == [512, 16]
    # the same names again (a generation's next step) reuse the bank; other names build their own
    assert registry.batch(["system", "other"] * 16, 32).prefix.bank is mixed.bank
    swapped = registry.batch(["other", "system"] * 16, 32).prefix
    assert swapped.bank is not mixed.bank and swapped.prefix_lens.tolist() == [16, 512]


def test_compiled_soft_prompt_is_computed_once_and_again_when_its_parameters_change():
    torch.manual_seed(0)
    model = fastprompt.patch(tiny_peft_model("llama", "p_tuning_mlp", gqa=True, num_virtual_tokens=4).eval())
    registry = adapter_registry(model)
    assert registry.names() == ["default"] and registry.kind("default") == "p_tuning"
    first = registry.kv("default")
    assert registry.kv("default") is first, "not recomputed while nothing changed"
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.mlp_head[0].weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    second = registry.kv("default")
    assert second is not first and not torch.allclose(second, first)
    with torch.no_grad():
        embeddings = encoder(model.prompt_tokens["default"][None])
        kv_now = _prompt_kv_of_embeddings(model.get_base_model(), embeddings)
    assert_scaled_close(second, kv_now, 1e-5, "recomputed K/V")
    encoder.mlp_head[0].weight.data.mul_(2.0)  # invisible to version counters: invalidate says so
    assert registry.kv("default") is second
    registry.invalidate("default")
    assert not torch.allclose(registry.kv("default"), second)


def _prompt_kv_of_embeddings(base, embeddings: torch.Tensor) -> torch.Tensor:
    """Independent of fastprompt: an unpatched copy's DynamicCache after the virtual tokens, as [L, 2, Hkv, P, D]."""
    from transformers import DynamicCache

    copy = tiny_model("llama", gqa=True, seed=0).eval()
    copy.load_state_dict(base.state_dict())
    cache = DynamicCache(config=copy.config)
    copy.model(inputs_embeds=embeddings, use_cache=True, **{compat.cache_kwarg(copy.model): cache})
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


def test_peft_model_serves_its_own_adapters_and_loaded_ones(saved_adapters):
    torch.manual_seed(0)
    model = tiny_peft_model("llama", "prefix", gqa=True, num_virtual_tokens=5).eval()
    with torch.no_grad():
        expected = model.get_prompt(1)  # PEFT's own cache, before patching replaces get_prompt
    fastprompt.patch(model)
    load_adapter(model, saved_adapters["lstm"], "lstm")
    registry = adapter_registry(model)
    assert sorted(registry.names()) == ["default", "lstm"]
    kv = registry.kv("default")
    assert torch.equal(kv[1, 0], expected.layers[1].keys[0]) and torch.equal(kv[1, 1], expected.layers[1].values[0])
    served = registry.batch(["lstm", "default", "__base__"], 3)
    assert served.offsets.tolist() == [6, 5, 0]
    with pytest.raises(ValueError, match="'default' is already used \\(an adapter of this PeftModel\\)"):
        load_adapter(model, saved_adapters["mlp"], "default")


def test_exported_prefixes_load_back_and_serve_the_same_rows(saved_adapters, tmp_path):
    torch.manual_seed(0)
    source = _serving_model(saved_adapters)
    target = fastprompt.patch(_base())
    for name in ("proj", "lstm", "prompt"):
        path = tmp_path / f"{name}.safetensors"
        exported = export_prefix_kv(source, name)
        assert exported.position_offset == exported.length and exported.dtype == torch.float32
        exported.save(path)
        load_prefix_kv(target, path, name)
    assert adapter_registry(target).kind("lstm") == "p_tuning"
    batch = random_batch(4, 6, padding="left")
    names = ["proj", "prompt", "lstm", "__base__"]
    assert torch.equal(_serve(target, names, batch), _serve(source, names, batch))


def test_bad_names_and_batches_are_refused_by_message(saved_adapters):
    model = _serving_model(saved_adapters)
    registry = adapter_registry(model)
    with pytest.raises(ValueError, match=r"unknown adapter name 'nope'; this model serves \['__base__', 'proj'"):
        registry.batch(["proj", "nope"], 2)
    with pytest.raises(ValueError, match="adapter_names has 2 names but the batch has 3 rows"):
        registry.batch(["proj", "deep"], 3)
    with pytest.raises(ValueError, match="one name per batch row"):
        registry.batch("proj", 1)
    with pytest.raises(ValueError, match="'proj' is already used"):
        load_adapter(model, saved_adapters["deep"], "proj")
    with pytest.raises(ValueError, match="'prompt' is already used"):
        cache_prompt(model, "prompt", _prompt())
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        load_prefix_kv(model, export_prefix_kv(model, "proj"), "__base__")
    with pytest.raises(ValueError, match="non-empty string"):
        cache_prompt(model, "", _prompt())


def test_cache_prompt_refuses_padding_empty_prompts_and_batches():
    model = fastprompt.patch(_base())
    prompt = _prompt()
    with pytest.raises(ValueError, match="got padding"):
        cache_prompt(model, "p", prompt, attention_mask=torch.tensor([[0] + [1] * (PROMPT_LEN - 1)]))
    with pytest.raises(ValueError, match="no tokens"):
        cache_prompt(model, "p", prompt[:, :0])
    with pytest.raises(ValueError, match="batch size 2"):
        cache_prompt(model, "p", prompt.expand(2, -1))
    with pytest.raises(ValueError, match=r"integer tensor \[1, P\]"):
        cache_prompt(model, "p", prompt.float())
    with pytest.raises(ValueError, match="eval mode"):
        cache_prompt(model.train(), "p", prompt)
    assert "p" not in adapter_registry(model)
    cache_prompt(model.eval(), "p", prompt, attention_mask=torch.ones_like(prompt))
    assert "p" in adapter_registry(model)


@pytest.mark.parametrize(
    ("method", "model_kwargs", "message"),
    [
        ("prefix", {"layers": 3}, r"made for a model with 2 layers.*: layers 2 vs the model's 3"),
        ("prefix_projection", {"gqa": False}, r"key/value heads 2 vs the model's 4"),
        ("prefix", {"hidden": 64}, r"head size 8 vs the model's 16"),
        ("p_tuning_mlp", {"hidden": 64}, r"hidden size 32 but this model's input embeddings have hidden size 64"),
    ],
    ids=["layers", "kv-heads", "head-size", "hidden-size"],
)
def test_adapters_of_another_model_are_refused_naming_what_differs(method, model_kwargs, message, tmp_path):
    tiny_peft_model("llama", method, gqa=True).save_pretrained(tmp_path)
    kwargs = {"gqa": True, **model_kwargs}
    model = fastprompt.patch(tiny_model("llama", **kwargs).eval())
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path, "a")
    assert "a" not in adapter_registry(model)


def test_exported_prefix_of_another_model_is_refused(saved_adapters):
    exported = export_prefix_kv(_serving_model(saved_adapters), "prompt")
    model = fastprompt.patch(tiny_model("llama", gqa=True, layers=3).eval())
    with pytest.raises(ValueError, match=r"cached_prompt prefix was made for a model with 2 layers.*: layers 2 vs the"):
        load_prefix_kv(model, exported, "p")
    with pytest.raises(ValueError, match=r"prefix 'q' must be \[layers, 2, Hkv, P, D\]"):
        adapter_registry(model).add_kv("q", exported.kv, "cached_prompt")
    assert isinstance(exported, ExportedPrefix)


def test_other_adapter_types_and_bidirectional_models_are_refused(tmp_path):
    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    model = fastprompt.patch(_base())
    with pytest.raises(fastprompt.UnsupportedModelError, match="is LORA; load_adapter takes prompt-learning"):
        load_adapter(model, tmp_path / "lora", "lora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path / "nothing", "x")
    with pytest.raises(fastprompt.UnsupportedModelError, match=r"is not patched: call fastprompt.patch\(model\) first"):
        cache_prompt(_base(), "p", _prompt())
    tiny_peft_model("bert", "p_tuning_mlp", task="seq_cls").save_pretrained(tmp_path / "bert")
    bert = fastprompt.patch(tiny_model("bert", "seq_cls").eval())
    with pytest.raises(fastprompt.UnsupportedModelError, match="needs a causal \\(decoder\\) model, but Bert"):
        load_adapter(bert, tmp_path / "bert", "p")
    with pytest.raises(fastprompt.UnsupportedModelError, match="attends bidirectionally"):
        cache_prompt(bert, "p", torch.full((1, 3), PAD + 5))


NEW = 4
GREEDY = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=PAD, output_logits=True,
              return_dict_in_generate=True)


def _alone_greedy(name: str, tokens: torch.Tensor, saved_adapters: dict[str, str]):
    """Greedy decoding of one unpadded row alone, a full forward through PEFT (or the unpatched model, prompt in
    front) per new token: ([NEW] tokens, [NEW, V] logits of each step)."""
    logits = []
    for _ in range(NEW):
        logits.append(_alone(name, tokens, saved_adapters)[-1])
        tokens = torch.cat([tokens, logits[-1].argmax(-1, keepdim=True)])
    return tokens[-NEW:], torch.stack(logits)


def _assert_generate_equals_rows_alone(model, names: list[str], saved_adapters: dict[str, str]) -> None:
    batch = random_batch(len(names), 6, padding="left", seed=5)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             adapter_names=names, **GREEDY)
    for row, name in enumerate(names):
        tokens, logits = _alone_greedy(name, batch["input_ids"][row][batch["attention_mask"][row].bool()],
                                       saved_adapters)
        assert torch.equal(out.sequences[row, -NEW:], tokens), f"row {row} ({name}): greedy tokens"
        assert_scaled_close(torch.stack(out.logits)[:, row], logits, 1e-5, f"row {row} ({name}): step logits")
    assert out.past_key_values.get_seq_length() == 6 + NEW - 1, "the cache holds the real columns only"


def test_generate_of_mixed_rows_equals_each_row_alone(saved_adapters):
    model = _serving_model(saved_adapters)
    _assert_generate_equals_rows_alone(model, ["lstm", "prompt", "__base__", "proj", "soft"], saved_adapters)


def _peft_serving_model(saved_adapters: dict[str, str], first: str, second: str, loaded: str) -> PeftModel:
    """A PeftModel holding two adapters of one type (``first`` active), patched, with an adapter ``loaded``
    through fastprompt and a cached prompt registered on top."""
    model = PeftModel.from_pretrained(_base(), saved_adapters[first], adapter_name=first)
    model.load_adapter(saved_adapters[second], adapter_name=second)
    model = fastprompt.patch(model.eval())
    load_adapter(model, saved_adapters[loaded], loaded)
    cache_prompt(model, "prompt", _prompt())
    return model


@pytest.mark.parametrize(
    ("first", "second", "loaded"), [("proj", "deep", "lstm"), ("mlp", "lstm", "soft")], ids=["prefix", "p-tuning"]
)
def test_peft_model_forward_and_generate_serve_mixed_rows(saved_adapters, first, second, loaded):
    """PEFT's own adapters (prefix tuning; or P-tuning, served compiled) next to one loaded through fastprompt,
    a cached prompt and the base model; the active adapter without adapter_names is unchanged."""
    model = _peft_serving_model(saved_adapters, first, second, loaded)
    names = [second, loaded, "__base__", first, "prompt", second]
    batch = random_batch(len(names), 7, padding="left")
    _assert_rows_equal_alone(model, names, batch, saved_adapters)
    _assert_generate_equals_rows_alone(model, names[:5], saved_adapters)
    with torch.no_grad():
        active = model(input_ids=batch["input_ids"][:1]).logits[0, -7:]
    assert_scaled_close(active, _alone(first, batch["input_ids"][0], saved_adapters), 1e-5, "active adapter")


def test_kv_cache_of_32_rows_sharing_a_512_token_prompt_holds_no_copy_of_it():
    model = fastprompt.patch(_base(max_positions=1024))
    cache_prompt(model, "system", torch.randint(4, VOCAB, (1, 512), generator=torch.Generator().manual_seed(0)))
    kv = adapter_registry(model).kv("system")
    batch = random_batch(32, 8, padding="left")
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             adapter_names=["system"] * 32, **{**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3})
    cache = out.past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    layers, kv_heads, head_dim = 2, 2, 8
    # rows x real tokens (8 of the batch and 3 - 1 decoded and fed back); a copied prompt would add 32 x 512 columns
    assert stored == layers * 2 * 32 * (8 + 3 - 1) * kv_heads * head_dim * 4
    bank = cache.prefix.bank
    assert bank.shape[2] == 1 and bank.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr(), "no copy"


def test_bad_adapter_names_are_refused_in_forward_and_generate(saved_adapters):
    model = _serving_model(saved_adapters)
    batch = random_batch(2, 5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for run in (model, lambda **kw: model.generate(**kw, max_new_tokens=2, pad_token_id=PAD)):
        with pytest.raises(ValueError, match=r"unknown adapter name 'nope'; this model serves \['__base__', 'proj'"):
            run(**inputs, adapter_names=["proj", "nope"])
        with pytest.raises(ValueError, match="adapter_names has 3 names but the batch has 2 rows"):
            run(**inputs, adapter_names=["proj", "deep", "soft"])
        with pytest.raises(ValueError, match="one name per batch row"):
            run(**inputs, adapter_names="proj")
    with pytest.raises(fastprompt.UnsupportedModelError, match="num_beams > 1 would multiply the rows"):
        model.generate(**inputs, adapter_names=["proj", "deep"], num_beams=2, max_new_tokens=2, pad_token_id=PAD)
    served = adapter_registry(model).batch(["proj", "deep"], 2)
    with pytest.raises(ValueError, match="either adapter_names or fastprompt_prefix"):
        model(**inputs, adapter_names=["proj", "deep"], fastprompt_prefix=served.prefix)
    peft_model = _peft_serving_model(saved_adapters, "proj", "deep", "lstm")
    with pytest.raises(ValueError, match=r"unknown adapter name 'soft'; this model serves \['__base__', 'lstm', "):
        peft_model(**inputs, adapter_names=["soft", "deep"])
    with pytest.raises(ValueError, match="adapter_names has 1 names but the batch has 2 rows"):
        peft_model.generate(**inputs, adapter_names=["deep"], max_new_tokens=2)


def test_soft_prompt_rows_of_a_bidirectional_peft_model_are_refused():
    model = fastprompt.patch(tiny_peft_model("bert", "p_tuning_mlp", task="seq_cls").eval())
    batch = random_batch(2, 5)
    with pytest.raises(fastprompt.UnsupportedModelError, match="needs a causal \\(decoder\\) model, but Bert"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=["default"] * 2)


def test_training_through_adapter_names_reaches_each_row_s_adapter_or_is_refused(saved_adapters):
    """Prefix-tuning rows carry gradients to their own adapter only; a soft prompt cannot be trained compiled."""
    model = tiny_peft_model("llama", "prefix_projection", gqa=True, num_virtual_tokens=5)
    model.add_adapter("deep", peft_config("prefix", "causal_lm", num_virtual_tokens=3))
    model.prompt_encoder.requires_grad_(True)
    fastprompt.patch(model.train())
    batch = random_batch(3, 5, padding="left")
    out = model(**batch, adapter_names=["deep", "__base__", "deep"])
    out.loss.backward()
    grads = {name: [p.grad for p in model.prompt_encoder[name].parameters()] for name in ("default", "deep")}
    assert grads["deep"] and all(g is not None and g.abs().sum() > 0 for g in grads["deep"]), "no gradient"
    assert all(g is None for g in grads["default"]), "a row's gradient reached an adapter no row named"
    soft = fastprompt.patch(tiny_peft_model("llama", "p_tuning_mlp", gqa=True).train())
    with pytest.raises(fastprompt.UnsupportedModelError, match="P_TUNING adapter in adapter_names .* cannot be tra"):
        soft(**batch, adapter_names=["default"] * 3)


def test_unpatch_of_a_plain_model_restores_forward_and_generate_exactly():
    model = _base()
    attrs = dict(model.__dict__)
    batch = random_batch(2, 5, padding="left")
    fastprompt.patch(model)
    with torch.no_grad():
        assert torch.equal(_serve(model, ["__base__"] * 2, batch),
                           model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits)
    fastprompt.unpatch(model)
    assert model.__dict__ == attrs


def test_trainable_prefix_adapter_gives_differentiable_kv_after_a_cached_serving_call():
    torch.manual_seed(0)
    model = fastprompt.patch(tiny_peft_model("llama", "prefix_projection", gqa=True, num_virtual_tokens=4))
    registry = adapter_registry(model)
    with torch.no_grad():
        served = registry.kv("default")
    assert registry.kv("default").requires_grad, "a kept serving result must not stand in for a training forward"
    bank = registry.batch(["default", "__base__"], 2).prefix.bank
    assert torch.equal(bank[:, :, 0].detach(), served)
    (bank * torch.randn(bank.shape)).sum().backward()
    weight = model.prompt_encoder["default"].transform[0].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert registry.batch(["default"], 1).prefix.bank is not bank, "a bank with a graph is never reused"
