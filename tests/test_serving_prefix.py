"""Prefix banks at the data level (fastprompt.prefix), independent of a model forward:

- stacking blocks of different lengths into one bank holds each block once (a single block is not copied);
- row offsets and position ids follow each row's prefix length and its own padding;
- a PEFT adapter's K/V and virtual-token embeddings equal what PEFT itself computes;
- an exported prefix survives save/load exactly and refuses another model's geometry, naming what differs.
"""

from __future__ import annotations

import pytest
import torch
from models import assert_scaled_close, tiny_config, tiny_peft_model
from safetensors.torch import save_file

from fastprompt.hf.patching import token_positions
from fastprompt.methods import Output
from fastprompt.methods.peft_format import method_of
from fastprompt.prefix import ExportedPrefix, KVGeometry, row_offsets, row_position_ids, stack_prefixes

L, HKV, D = 2, 2, 8


def _block(length: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(L, 2, HKV, length, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_stacked_bank_holds_each_block_once_with_its_length():
    blocks = [_block(5, 0), _block(3, 1), _block(7, 2)]
    bank, lens = stack_prefixes(blocks)
    assert bank.shape == (L, 2, 3, HKV, 7, D)
    assert lens.tolist() == [5, 3, 7] and lens.dtype == torch.int32
    for i, kv in enumerate(blocks):
        assert torch.equal(bank[:, :, i, :, : kv.shape[3]], kv)
        assert not bank[:, :, i, :, kv.shape[3] :].any(), "columns past a row's length are zeros, never garbage"
    assert bank.numel() == 3 * blocks[2].numel(), "one copy per block, padded to the longest"


def test_a_single_block_is_not_copied():
    kv = _block(512, 0)
    bank, lens = stack_prefixes([kv])
    assert bank.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    assert bank.shape == (L, 2, 1, HKV, 512, D) and lens.tolist() == [512]


def test_stacking_passes_gradients_to_every_block():
    blocks = [_block(4, 0).requires_grad_(), _block(2, 1).requires_grad_()]
    bank, _ = stack_prefixes(blocks)
    weights = torch.randn(bank.shape)
    (bank * weights).sum().backward()
    assert torch.equal(blocks[0].grad, weights[:, :, 0, :, :4])
    assert torch.equal(blocks[1].grad, weights[:, :, 1, :, :2])


def test_stacking_refuses_blocks_that_do_not_fit_together():
    with pytest.raises(ValueError, match="at least one prefix block"):
        stack_prefixes([])
    with pytest.raises(ValueError, match=r"block 1 has shape .* share layers, heads and head size"):
        stack_prefixes([_block(4, 0), torch.randn(L, 2, HKV + 1, 4, D)])
    with pytest.raises(ValueError, match="block 1 is torch.float64"):
        stack_prefixes([_block(4, 0), _block(4, 1, torch.float64)])
    with pytest.raises(ValueError, match=r"block 0 must be \[L, 2, Hkv, P, D\]"):
        stack_prefixes([torch.randn(L, 3, HKV, 4, D)])


def test_row_offsets_and_positions_follow_prefix_length_and_padding():
    prefix_index = torch.tensor([1, -1, 0, 1], dtype=torch.int32)
    prefix_lens = torch.tensor([5, 3], dtype=torch.int32)
    offsets = row_offsets(prefix_index, prefix_lens)
    assert offsets.tolist() == [3, 0, 5, 3]
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]])
    positions = row_position_ids(offsets, mask)
    real = mask.bool()
    # each row's real tokens are numbered from its offset, whatever padding precedes them
    assert positions[0].tolist() == [3, 4, 5, 6]
    assert positions[1][real[1]].tolist() == [0, 1]
    assert positions[2][real[2]].tolist() == [5, 6, 7]
    assert positions[3][real[3]].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, S\] and offsets \[B\]"):
        row_position_ids(offsets[:3], mask)


def test_serving_and_patched_forward_number_a_row_alike():
    """One numbering rule: a hole inside a row keeps its column's number, trailing padding continues the count,
    leading padding is skipped; the patched forward's positions are the serving helper's."""
    offsets = torch.tensor([0, 4, 2])
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0]])
    positions = row_position_ids(offsets, mask)
    assert positions.tolist() == [[0, 1, 2, 3], [4, 4, 5, 6], [2, 3, 4, 5]]
    torch.testing.assert_close(token_positions(mask, None, offsets, 4), positions, rtol=0, atol=0)


def _produce(model):
    """What the active adapter's method produces from the model's own encoder, and the method."""
    config = model.peft_config["default"]
    method = method_of(config)
    return method.produce(model.prompt_encoder["default"], config), method


@pytest.mark.parametrize("method", ["prefix_projection", "prefix"])
def test_prefix_tuning_kv_is_peft_s_cache(method):
    model = tiny_peft_model("llama", method, gqa=True, num_virtual_tokens=6).eval()
    with torch.no_grad():
        expected = model.get_prompt(1)
        kv, declared = _produce(model)
    assert declared.output is Output.KV
    assert kv.shape == (L, 2, HKV, 6, D)
    for layer in range(L):
        assert_scaled_close(kv[layer, 0], expected.layers[layer].keys[0], 1e-6, f"keys of layer {layer}")
        assert_scaled_close(kv[layer, 1], expected.layers[layer].values[0], 1e-6, f"values of layer {layer}")


@pytest.mark.parametrize("method", ["p_tuning_mlp", "p_tuning_lstm", "prompt_tuning"])
def test_virtual_token_embeddings_are_peft_s_prompts(method):
    model = tiny_peft_model("llama", method, num_virtual_tokens=6).eval()
    with torch.no_grad():
        expected = model.get_prompt(1)[0]
        actual, declared = _produce(model)
    assert declared.output is Output.EMBEDDINGS
    assert_scaled_close(actual, expected, 1e-5, "virtual-token embeddings")


@pytest.mark.parametrize("method", ["prefix_projection", "p_tuning_lstm"])
def test_saved_adapter_rebuilds_as_the_table_peft_saved(method, tmp_path):
    from peft import PeftConfig
    from safetensors.torch import load_file

    model = tiny_peft_model("llama", method, gqa=True, num_virtual_tokens=4)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    config = PeftConfig.from_pretrained(tmp_path)
    build_prompt_encoder = method_of(config).build_encoder
    encoder = build_prompt_encoder(config, saved)
    assert torch.equal(encoder.embedding.weight, saved)
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"saved prompt_embeddings have shape \(3, .*needs \(4, "):
        build_prompt_encoder(config, saved[:3])


def _exported(dtype: torch.dtype = torch.float32, **geometry) -> ExportedPrefix:
    geo = KVGeometry(**{"num_layers": L, "num_kv_heads": HKV, "head_dim": D, "model_type": "llama", **geometry})
    return ExportedPrefix(kv=_block(6, 3, dtype), position_offset=6, geometry=geo, kind="cached_prompt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_round_trip_is_exact(dtype, tmp_path):
    exported = _exported(dtype, name_or_path="tiny/llama")
    path = tmp_path / "prefix.safetensors"
    exported.save(path)
    loaded = ExportedPrefix.load(path)
    assert loaded.kv.dtype == dtype and torch.equal(loaded.kv, exported.kv)
    assert (loaded.position_offset, loaded.geometry, loaded.kind) == (6, exported.geometry, "cached_prompt")
    assert loaded.length == 6 and loaded.dtype == dtype


def test_export_header_is_readable_without_fastprompt(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "prefix.safetensors"
    _exported().save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["position_offset"] == "6" and meta["dtype"] == "float32" and meta["kind"] == "cached_prompt"
    assert '"num_kv_heads": 2' in meta["geometry"] and meta["layout"].startswith("[layers, 2 (keys, values)")


def test_geometry_check_names_what_differs():
    exported = _exported()
    exported.check_fits(tiny_config("llama", gqa=True))
    with pytest.raises(ValueError, match=r"layers 2 vs the model's 3"):
        exported.check_fits(tiny_config("llama", gqa=True, layers=3))
    with pytest.raises(ValueError, match=r"key/value heads 2 vs the model's 4"):
        exported.check_fits(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"head size 8 vs the model's 16"):
        exported.check_fits(tiny_config("llama", gqa=True, hidden=64))
    with pytest.raises(ValueError, match=r"model type 'llama' vs the model's 'qwen2'"):
        exported.check_fits(tiny_config("qwen2", gqa=True))


def test_exported_prefix_refuses_bad_contents(tmp_path):
    geometry = KVGeometry(L, HKV, D)
    with pytest.raises(ValueError, match=r"must be \[layers, 2, Hkv, P, D\] = \[2, 2, 2, P >= 1, 8\]"):
        ExportedPrefix(kv=torch.randn(L, 2, HKV + 1, 6, D), position_offset=6, geometry=geometry)
    with pytest.raises(ValueError, match="position_offset must be the prefix length 6"):
        ExportedPrefix(kv=_block(6, 0), position_offset=4, geometry=geometry)
    other = tmp_path / "other.safetensors"
    save_file({"kv": _block(6, 0)}, str(other))
    with pytest.raises(ValueError, match="is not an exported fastprompt prefix"):
        ExportedPrefix.load(other)
