"""The user's entry point: compile adapters to prefixes once, then build vLLM's engine arguments and requests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fastprompt.engines.vllm.store import PrefixEntry, read_index, write_store
from fastprompt.prefix import ExportedPrefix

__all__ = ["BASE", "PromptAdapters"]

BASE = "__base__"
CONNECTOR = "FastpromptPrefixConnector"
CONNECTOR_MODULE = "fastprompt.engines.vllm.connector"

AdapterSource = str | os.PathLike[str] | ExportedPrefix


def _is_exported_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def compile_prefixes(
    model: str | os.PathLike[str],
    adapters: Mapping[str, AdapterSource],
    prompts: Mapping[str, Sequence[int]],
    dtype: torch.dtype,
) -> dict[str, ExportedPrefix]:
    """Each adapter and prompt as an :class:`ExportedPrefix` of ``model`` (K/V [L, 2, Hkv, P, D] in ``dtype``).

    ``adapters``: a PEFT prompt-learning adapter folder (every kind :func:`fastprompt.load_adapter` reads), an
    exported prefix file or an :class:`ExportedPrefix`; ``prompts``: token ids of fixed prompts (few-shot
    demonstrations, a system prompt), run once through the model. The frozen model runs here once, in this process;
    vLLM's workers never load it twice. Raises what :func:`fastprompt.load_adapter` / ``load_prefix_kv`` raise for
    an adapter of another model (naming the dimension that differs).
    """
    from transformers import AutoModelForCausalLM

    import fastprompt

    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    patched = fastprompt.patch(base)
    for name, source in adapters.items():
        if isinstance(source, ExportedPrefix) or _is_exported_file(Path(source)):
            fastprompt.load_prefix_kv(patched, source, name)
        else:
            fastprompt.load_adapter(patched, source, name)
    for name, token_ids in prompts.items():
        fastprompt.cache_prompt(patched, name, torch.tensor([list(token_ids)]))
    with torch.no_grad():
        return {name: fastprompt.export_prefix_kv(patched, name) for name in (*adapters, *prompts)}


class PromptAdapters:
    """Every prompt-learning adapter and cached prompt of one model, served by vLLM side by side.

    Example::

        adapters = PromptAdapters("path/to/model", {"sst2": "adapters/sst2", "qa": "exports/qa.safetensors"},
                                  prompts={"fewshot": tokenizer("...").input_ids})
        llm = vllm.LLM(**adapters.engine_args(block_size=32))
        requests = [adapters.request("sst2", "great movie"), adapters.request(BASE, [5, 6, 7])]
        outputs = llm.generate([p for p, _ in requests], [s for _, s in requests])

    Each adapter becomes per-layer K/V once (P-tuning and prompt tuning are compiled through the frozen model) and
    is saved to ``directory`` (a temporary one by default, kept as long as this object); vLLM's workers read it
    there through :class:`~fastprompt.engines.vllm.connector.FastpromptPrefixConnector`. A request naming an
    adapter of length P is its prompt's token ids behind P placeholder ids, with the adapter's ``cache_salt`` and
    ``kv_transfer_params``; its real tokens take positions P.., its prefix comes from the adapter.

    Args:
        model: the base model's folder (or hub name), as vLLM loads it.
        adapters: name -> PEFT adapter folder, exported prefix file or :class:`ExportedPrefix`.
        prompts: name -> token ids [P] of a fixed prompt to serve as a named prefix.
        dtype: the dtype vLLM runs the model in (the prefixes are computed and stored in it).
        directory: where the prefixes are written; reused as is when ``adapters`` and ``prompts`` are both empty
            (a directory written before, e.g. by another process).
        placeholder_id: the token id of the placeholder positions (never embedded: their K/V come from the
            prefix); any id of the vocabulary.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        adapters: Mapping[str, AdapterSource] | None = None,
        *,
        prompts: Mapping[str, Sequence[int]] | None = None,
        dtype: torch.dtype = torch.float32,
        directory: str | os.PathLike[str] | None = None,
        placeholder_id: int = 0,
    ) -> None:
        adapters, prompts = dict(adapters or {}), dict(prompts or {})
        if BASE in adapters or BASE in prompts:
            raise ValueError(f"{BASE!r} names the model without an adapter; choose another adapter name")
        both = set(adapters) & set(prompts)
        if both:
            raise ValueError(f"{sorted(both)} named both an adapter and a prompt")
        self.model = os.fspath(model)
        self.dtype = dtype
        self.placeholder_id = placeholder_id
        self._tempdir = None
        if directory is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="fastprompt-vllm-")
            directory = self._tempdir.name
        self.directory = Path(directory)
        if adapters or prompts:
            self.entries: dict[str, PrefixEntry] = write_store(
                self.directory, compile_prefixes(self.model, adapters, prompts, dtype)
            )
        else:
            self.entries = read_index(self.directory)
        self._tokenizer = None
        # the engine's limit, once engine_args was given one: requests are checked against it by default
        self.max_model_len: int | None = None

    @property
    def names(self) -> list[str]:
        """The adapters and prompts a request may name (besides :data:`BASE`)."""
        return sorted(self.entries)

    def kv_transfer_config(self) -> dict[str, Any]:
        """vLLM's ``kv_transfer_config`` (also ``vllm serve --kv-transfer-config`` as JSON)."""
        return {
            "kv_connector": CONNECTOR,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"fastprompt_prefix_dir": str(self.directory)},
        }

    def engine_args(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` / ``EngineArgs``: the model, its dtype, the connector and prefix caching
        (which shares each adapter's written blocks among its requests); ``overrides`` win."""
        from vllm.config import KVTransferConfig

        args: dict[str, Any] = {
            "model": self.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "enable_prefix_caching": True,
            "kv_transfer_config": KVTransferConfig(**self.kv_transfer_config()),
        }
        args.update(overrides)
        if overrides.get("max_model_len") is not None:
            self.max_model_len = int(overrides["max_model_len"])
        return args

    def prefix_length(self, name: str) -> int:
        """P of ``name`` (0 for :data:`BASE`); ``KeyError`` naming an unknown adapter and the known ones."""
        if name == BASE:
            return 0
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"unknown adapter {name!r}: this engine serves {self.names} (and {BASE!r})")
        return entry.length

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids as vLLM would form them (the model's tokenizer, its special tokens added)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
        return self._tokenizer(text).input_ids

    def prompt(self, name: str, prompt: str | Sequence[int], max_model_len: int | None = None) -> dict[str, Any]:
        """vLLM's prompt dict for ``prompt`` (text or token ids [T]) under adapter ``name``: ``prompt_token_ids``
        [P + T] (P placeholders, then the prompt) and, for an adapter, ``cache_salt``.

        ``max_model_len`` (default: the one :meth:`engine_args` was given, if any): a prompt whose P + T exceeds it
        is refused here, naming both parts."""
        length = self.prefix_length(name)
        max_model_len = self.max_model_len if max_model_len is None else max_model_len
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("the prompt has no tokens; vLLM needs at least one after the adapter's prefix")
        if max_model_len is not None and length + len(token_ids) > max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens and adapter {name!r} takes {length} positions: "
                f"{length + len(token_ids)} > max_model_len {max_model_len}"
            )
        if name == BASE:
            return {"prompt_token_ids": token_ids}
        return {
            "prompt_token_ids": [self.placeholder_id] * length + token_ids,
            "cache_salt": self.entries[name].salt,
        }

    def kv_transfer_params(self, name: str) -> dict[str, Any] | None:
        """What a request under ``name`` carries to the connector (``None`` for :data:`BASE`)."""
        from fastprompt.engines.vllm.connector import PARAM_KEY

        self.prefix_length(name)
        return None if name == BASE else {PARAM_KEY: name}

    def request(
        self, name: str, prompt: str | Sequence[int], sampling_params: Any = None, max_model_len: int | None = None
    ) -> tuple[dict[str, Any], Any]:
        """``(prompt dict, SamplingParams)`` of one request under adapter ``name`` (or :data:`BASE`) for
        ``LLM.generate``; ``sampling_params`` (a ``vllm.SamplingParams``, default greedy) is copied, not changed.

        Refuses prompt logprobs under an adapter: vLLM computes them by reading no cache, which would run the
        placeholders as tokens instead of the adapter's prefix."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0) if sampling_params is None else sampling_params.clone()
        transfer = self.kv_transfer_params(name)
        if transfer is not None:
            if params.prompt_logprobs is not None:
                raise ValueError(f"prompt logprobs are not available under adapter {name!r} (only on {BASE!r})")
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": transfer}
        return self.prompt(name, prompt, max_model_len), params
