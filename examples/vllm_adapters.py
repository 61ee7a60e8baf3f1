"""Prompt-learning adapters of different kinds, a few-shot prompt and the base model in one vLLM batch.

Run in vLLM's environment (README, "Serving with vLLM")::

    python examples/vllm_adapters.py

A random-weight Llama and two adapters trained elsewhere (here: freshly initialised) and saved in PEFT's format;
vLLM serves them side by side, and each answer equals fastprompt's own ``generate`` with the same adapter.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU


def main() -> None:
    import torch
    import vllm
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastprompt
    from fastprompt.engines.vllm import BASE, PromptAdapters

    root = tempfile.mkdtemp()
    # head size 32: vLLM's CPU attention has kernels for it
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(f"{root}/model")
    get_peft_model(LlamaForCausalLM(config), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=True)).save_pretrained(f"{root}/summarize")
    get_peft_model(LlamaForCausalLM(config), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=40, encoder_reparameterization_type="LSTM",
        encoder_hidden_size=64)).save_pretrained(f"{root}/translate")
    demonstrations = torch.randint(3, 1000, (48,)).tolist()

    # every adapter becomes per-layer K/V once, here; vLLM's workers read them from adapters.directory
    adapters = PromptAdapters(f"{root}/model", {"summarize": f"{root}/summarize", "translate": f"{root}/translate"},
                              prompts={"few-shot": demonstrations})
    llm = vllm.LLM(**adapters.engine_args(block_size=32, max_model_len=256, skip_tokenizer_init=True))

    params = vllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    rows = [("summarize", [5, 6, 7, 8]), ("translate", [9, 10, 11]), ("few-shot", [12, 13]), (BASE, [14, 15, 16])]
    requests = [adapters.request(name, prompt, params) for name, prompt in rows]
    outputs = llm.generate([p for p, _ in requests], [s for _, s in requests])

    # the same rows through fastprompt's patched transformers model
    model = fastprompt.patch(LlamaForCausalLM.from_pretrained(f"{root}/model").eval())
    fastprompt.load_adapter(model, f"{root}/summarize", "summarize")
    fastprompt.load_adapter(model, f"{root}/translate", "translate")
    fastprompt.cache_prompt(model, "few-shot", torch.tensor([demonstrations]))
    model.generation_config.eos_token_id = None
    for (name, prompt), output in zip(rows, outputs, strict=True):
        with torch.no_grad():
            expected = model.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=8,
                                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        print(f"{name:>10}: {list(output.outputs[0].token_ids)}")
        assert list(output.outputs[0].token_ids) == expected


if __name__ == "__main__":  # vLLM's CPU engine may start processes that import this file
    main()
