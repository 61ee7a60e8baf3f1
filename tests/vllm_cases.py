"""Cases shared by the vLLM tests and the vLLM benchmark: a tiny random Llama saved where vLLM can load it, PEFT
adapters of every prompt-learning kind on it, and the reference every vLLM answer is held to: fastprompt's patched
transformers model, ``generate(..., adapter_names=[name])``, greedy, float32.

vLLM's CPU attention needs head sizes it has kernels for (32 here) and cache blocks of a multiple of 32 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from models import VOCAB, tiny_model, tiny_peft_model

import fastprompt

BLOCK = 32
# hidden 128 over 4 query heads: head size 32; 2 key/value heads (GQA)
SHAPE = {"gqa": True, "hidden": 128, "heads": 4, "layers": 2}


@dataclass(frozen=True)
class AdapterCase:
    """A PEFT ``method`` of tests/models.py with ``length`` virtual tokens, initialised from ``seed``."""

    method: str
    length: int
    seed: int = 0


def save_model(folder: Path, seed: int = 0, **shape: Any) -> Path:
    """The tiny random Llama (``SHAPE``, overridden by ``shape``) saved in transformers' format."""
    tiny_model("llama", seed=seed, **{**SHAPE, **shape}).save_pretrained(folder)
    return folder


def save_adapters(root: Path, cases: dict[str, AdapterCase], **shape: Any) -> dict[str, str]:
    """Each case as a PEFT adapter folder under ``root``, by name."""
    folders = {}
    for name, case in cases.items():
        folder = root / name
        model = tiny_peft_model("llama", case.method, seed=case.seed, num_virtual_tokens=case.length,
                                **{**SHAPE, **shape})
        model.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def random_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``low .. high`` token ids each (never the placeholder id 0 or the special ids)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]


class Reference:
    """fastprompt's patched transformers model with the same adapters and prompts: what vLLM must equal."""

    def __init__(self, model_dir: Path, adapters: dict[str, Any], prompts: dict[str, list[int]]):
        from transformers import AutoModelForCausalLM

        self.model = fastprompt.patch(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
        for name, source in adapters.items():
            if str(source).endswith(".safetensors"):
                fastprompt.load_prefix_kv(self.model, source, name)
            else:
                fastprompt.load_adapter(self.model, source, name)
        for name, token_ids in prompts.items():
            fastprompt.cache_prompt(self.model, name, torch.tensor([token_ids]))
        # vLLM's requests ignore the end-of-sequence token, so every answer has the same length
        self.model.generation_config.eos_token_id = None

    def generate(self, name: str, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens [new_tokens] of one row alone and the log-probability of each."""
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                adapter_names=[name], max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=1,
            )
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens, strict=True)]
        return tokens, logprobs


# The adapters the vLLM tests serve: every kind; prefix lengths below, equal to and above the block of 32, mostly
# not multiples of it; "twin" has the length of "deep" (isolation).
CASES = {
    "proj": AdapterCase("prefix_projection", 10),
    "deep": AdapterCase("prefix", 45, seed=1),
    "mlp": AdapterCase("p_tuning_mlp", 32),
    "lstm": AdapterCase("p_tuning_lstm", 70),
    "soft": AdapterCase("prompt_tuning", 13),
    "twin": AdapterCase("prefix", 45, seed=2),
}
FEWSHOT = list(range(4, 40))  # a cached prompt of 36 tokens
NEW_TOKENS = 8
MAX_MODEL_LEN = 256


def build_setup(root: Path) -> tuple[Path, dict[str, str], dict[str, list[int]]]:
    """(model folder, adapter sources by name, cached prompts by name) under ``root``: ``CASES`` as PEFT folders,
    plus "exported", a P-tuning v2 prefix of 20 positions exported to a file through fastprompt, as another process
    would hand it over."""
    model_dir = save_model(root / "model")
    sources = save_adapters(root, CASES)
    exporter = Reference(model_dir, save_adapters(root / "other", {"exp": AdapterCase("prefix", 20, seed=3)}), {})
    sources["exported"] = str(root / "exported.safetensors")
    fastprompt.export_prefix_kv(exporter.model, "exp").save(sources["exported"])
    return model_dir, sources, {"fewshot": FEWSHOT}


def engine(adapters: Any, **overrides: Any) -> Any:
    """An in-process ``vllm.LLM`` serving ``adapters`` (a ``PromptAdapters``) on token ids."""
    import vllm

    args = {"block_size": BLOCK, "skip_tokenizer_init": True, "max_model_len": MAX_MODEL_LEN, "seed": 0, **overrides}
    return vllm.LLM(**adapters.engine_args(**args))


def close(llm: Any) -> None:
    """Shut an in-process engine down, so that the next one starts in a process without it."""
    llm.llm_engine.engine_core.shutdown()


def scheduler_connector(llm: Any) -> Any:
    """The scheduler-side connector of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return llm.llm_engine.engine_core.engine_core.scheduler.connector


def greedy_params(new_tokens: int = NEW_TOKENS) -> Any:
    """Greedy sampling of ``new_tokens`` tokens, each with its log-probability, no end-of-sequence stop."""
    import vllm

    return vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=0, detokenize=False)


def generate(llm: Any, adapters: Any, rows: list[tuple[str, list[int]]],
             new_tokens: int = NEW_TOKENS) -> list[tuple[list[int], list[float]]]:
    """One batch of ``(adapter name, prompt token ids)`` rows through vLLM: (tokens, log-probabilities) per row."""
    requests = [adapters.request(name, prompt, greedy_params(new_tokens), MAX_MODEL_LEN) for name, prompt in rows]
    outputs = llm.generate([p for p, _ in requests], [s for _, s in requests], use_tqdm=False)
    answers = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        answers.append((tokens, [step[t].logprob for step, t in zip(completion.logprobs, tokens, strict=True)]))
    return answers


def assert_equal_reference(answers: list[tuple[list[int], list[float]]], rows: list[tuple[str, list[int]]],
                           reference: Reference, tol: float = 1e-4) -> None:
    """Each answer's greedy tokens equal the reference's, its log-probabilities within ``tol``."""
    for row, ((name, prompt), (tokens, logprobs)) in enumerate(zip(rows, answers, strict=True)):
        want_tokens, want_logprobs = reference.generate(name, prompt, len(tokens))
        assert tokens == want_tokens, f"row {row} ({name}): vLLM {tokens} != fastprompt generate {want_tokens}"
        err = max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True))
        assert err <= tol, f"row {row} ({name}): log-probabilities differ by {err:.2e} > {tol:.0e}"


CHAT_TEMPLATE = (
    "<s>{% for message in messages %}w{{ 4 if message['role'] == 'user' else 5 }} {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}w6{% endif %}"
)


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of the tiny vocabulary beside the model: ids 0-3 ``<unk> <pad> <s> </s>``, then
    ``w4 .. w95``; ``<s>`` in front of every text, as Llama's; a chat template whose roles are words of it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def words(token_ids: list[int]) -> str:
    """The text of the tiny vocabulary's token ids 4.. (``save_tokenizer``)."""
    return " ".join(f"w{t}" for t in token_ids)
