"""P-tuning with prompts anywhere: placeholders in input_ids get the encoder outputs, anchors stay real."""

import pytest
import torch
from peft import PromptEncoderConfig, get_peft_model
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from fastprompt.hf.templates import PromptTemplate, PromptTemplateModel, scatter_prompts

pytestmark = pytest.mark.hf  # .ci/run repeats these on the floor versions

VOCAB = 64
PLACEHOLDER = VOCAB  # past the vocabulary: never looked up
TEMPLATE = PromptTemplate(spec=(2, 1, 3), placeholder_id=PLACEHOLDER)


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ))


def _bert():
    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    ))


MODELS = {"llama": (_llama, "CAUSAL_LM"), "bert": (_bert, "FEATURE_EXTRACTION")}


def _wrapped(kind, encoder_type):
    build, task = MODELS[kind]
    config = PromptEncoderConfig(
        task_type=task, num_virtual_tokens=TEMPLATE.num_virtual_tokens, token_dim=32, encoder_hidden_size=16,
        encoder_reparameterization_type=encoder_type,
    )
    peft_model = get_peft_model(build().eval(), config)
    with torch.no_grad():  # PEFT zero-inits nothing here, but draw all encoder weights fresh anyway
        for p in peft_model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return PromptTemplateModel(peft_model, TEMPLATE)


def _batch():
    examples = [[[5, 6, 7], [3]], [[9, 10], [3]]]  # a segment x, then the anchor (a [MASK]-like id 3)
    return TEMPLATE.build_batch(examples, pad_id=0)


def test_build_places_virtual_tokens_around_segments():
    P = PLACEHOLDER
    assert TEMPLATE.build([[5, 6], [3]]) == [P, P, 5, 6, P, 3, P, P, P]
    ids, mask = TEMPLATE.build_batch([[[5, 6], [3]], [[7], [3]]], pad_id=0, padding_side="left")
    assert ids.tolist() == [[P, P, 5, 6, P, 3, P, P, P], [0, P, P, 7, P, 3, P, P, P]]
    assert mask.tolist() == [[1] * 9, [0] + [1] * 8]


@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_forward_equals_explicit_inputs_embeds(kind, encoder_type, seed):
    model = _wrapped(kind, encoder_type)
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask).logits

    # explicit build: PEFT's encoder output written row by row into the placeholder slots
    peft_model = model.peft_model
    base = peft_model.get_base_model()
    prompts = peft_model.prompt_encoder["default"](peft_model.prompt_tokens["default"][None])[0]
    embeds = base.get_input_embeddings()(ids.clamp(max=VOCAB - 1)).clone()
    for b in range(ids.shape[0]):
        slots = (ids[b] == PLACEHOLDER).nonzero().flatten()
        embeds[b, slots] = prompts
    ref = base(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_train_step_then_save_load_round_trip(kind, tmp_path, seed):
    model = _wrapped(kind, "LSTM")
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100).clamp(max=VOCAB - 1)
    encoder = model.peft_model.prompt_encoder["default"]
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in encoder.parameters()) for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    for n, p in encoder.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"

    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PromptTemplateModel.from_pretrained(MODELS[kind][0]().eval(), str(tmp_path))
    # a fresh base model: copy the frozen weights (only the adapter is saved, as with PEFT)
    loaded.peft_model.get_base_model().load_state_dict(model.peft_model.get_base_model().state_dict())
    assert loaded.template == TEMPLATE
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_model_owns_its_encoder_cache():
    model = _wrapped("llama", "MLP").eval()
    with torch.no_grad():
        served = model.prompt_embeddings()
        assert model.prompt_embeddings() is served and len(model.encoder_cache) == 1
    assert model.prompt_embeddings().requires_grad  # training recomputes
    assert _wrapped("llama", "MLP").encoder_cache is not model.encoder_cache


def test_bad_inputs():
    with pytest.raises(ValueError, match="spec must hold"):
        PromptTemplate(spec=(3,), placeholder_id=1)
    with pytest.raises(ValueError, match="takes 2 segments"):
        TEMPLATE.build([[1]])
    with pytest.raises(ValueError, match="contains the placeholder id"):
        TEMPLATE.build([[PLACEHOLDER], [3]])
    emb = torch.nn.Embedding(VOCAB, 4)
    with pytest.raises(ValueError, match="exactly 6 placeholders"):
        scatter_prompts(torch.tensor([[PLACEHOLDER, 1]]), PLACEHOLDER, torch.randn(6, 4), emb)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        scatter_prompts(torch.zeros(2, 3), PLACEHOLDER, torch.randn(6, 4), emb)
    peft_model = _wrapped("llama", "MLP").peft_model
    with pytest.raises(ValueError, match="places 2 virtual tokens"):
        PromptTemplateModel(peft_model, PromptTemplate(spec=(1, 1), placeholder_id=PLACEHOLDER))
