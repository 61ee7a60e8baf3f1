"""The benchmark behind ``fastprompt bench``: fastprompt against the naive PEFT path, measured in one run.

The pieces are reusable on their own (``benchmarks/`` builds its cases with them):

- :func:`build_base_model`: a random-weight Llama-shaped model from a :class:`ModelShape`, or a local
  checkpoint directory (never downloaded);
- :func:`peft_config` / :func:`wrap`: the PEFT adapter of each method;
- :func:`random_batch`: random token ids with realistic left padding;
- :func:`build_case`: the three above in one call, ``(peft_model, batch)``;
- :func:`train_step` and :func:`generate_step`: the work that is timed;
- :func:`run`: every requested row, naive and patched on the same model object, alternating for
  :data:`ROUNDS` rounds (:func:`fastprompt.cli.benchutil.best_of_rounds`), each side's fastest kept;
- the serving rows (:data:`SERVING`, opt-in through ``rows``): fastprompt's ``adapter_names`` against the
  best a user can do without it, each side's outputs checked equal before anything is timed;
- :func:`format_markdown`, :func:`to_json`, :func:`plot`: the report, with device, versions, commit and
  the command line, so that a table can be committed verbatim under ``benchmarks/results/``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.metadata
import os
import platform
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastprompt.cli.benchutil import Measurement, best_of_rounds, measure, measure_pairs
from fastprompt.errors import first_line

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

METHODS = ("prefix-tuning", "p-tuning-v2", "p-tuning")
"""Training rows: prefix-tuning with its projection MLP, P-tuning v2 (deep prompts), P-tuning."""
GENERATE = "generate"
SERVING = ("few-shot", "shared-generate", "mixed-adapters")
"""Serving rows: a cached few-shot prompt (scoring), a shared prompt (generate), many adapters in one batch."""
DEFAULT_ROWS = (*METHODS, GENERATE)
"""What a run without ``--methods`` measures; the serving rows take minutes on a CPU and are opt-in."""
ROWS = (*DEFAULT_ROWS, *SERVING)

PAD_TOKEN_ID = 0


class CheckpointError(ValueError):
    """A local checkpoint given with ``--model`` that cannot be loaded."""


class OutputMismatchError(RuntimeError):
    """fastprompt and a baseline gave different outputs for the same work: nothing of that row is timed."""


ROUNDS = 3
"""Naive and patched alternate this many times per row; each keeps its fastest median (load comes and goes)."""

# The value changes no work an AdamW step does; the benchmark times steps, not convergence.
_LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder; the MLP is ``4 * hidden`` wide (as in Llama 3.2 1B)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def check(self) -> None:
        """Raise ValueError naming the first size that cannot make a Llama model."""
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.vocab < 2:
            raise ValueError(f"vocab must be at least 2 (token 0 is padding), got {self.vocab}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(
                f"hidden / heads = {self.hidden // self.heads} must be even (rotary embeddings rotate pairs)"
            )

    def describe(self) -> str:
        return (
            f"random-weight Llama: hidden {self.hidden}, layers {self.layers}, "
            f"heads {self.heads} / KV heads {self.kv_heads}, vocab {self.vocab}"
        )


@dataclass(frozen=True)
class ServingShape:
    """Sizes of the serving rows: ``serve_batch`` rows of ``query_len`` tokens (left padding on some rows,
    none in mixed-adapters) after a shared ``prompt_len``-token prompt, ``serve_new_tokens`` generated per row,
    ``adapters`` different prefix-tuning adapters in mixed-adapters (``serve_batch`` a multiple of it)."""

    serve_batch: int = 32
    prompt_len: int = 1024
    query_len: int = 32
    serve_new_tokens: int = 32
    adapters: int = 16

    def check(self) -> None:
        """Raise ValueError naming the first size that does not fit."""
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.serve_batch % self.adapters:
            raise ValueError(
                f"serve_batch ({self.serve_batch}) must be a multiple of adapters ({self.adapters}): "
                "mixed-adapters gives every adapter the same number of rows"
            )


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``fastprompt bench`` run measures. ``model`` is a shape or a local checkpoint."""

    rows: tuple[str, ...]
    model: ModelShape | Path
    batch: int
    seq_len: int
    prefix_len: int
    new_tokens: int
    dtype: torch.dtype
    device: torch.device
    iters: int
    warmup: int
    serving: ServingShape = ServingShape()


DEFAULTS: dict[str, dict[str, Any]] = {
    # Sized so that the whole default run, including the first-use build of the C++ kernels, stays well
    # under three minutes on two CPU cores.
    "cpu": dict(
        shape=ModelShape(hidden=256, layers=4, heads=8, kv_heads=2, vocab=1000),
        batch=4,
        seq_len=128,
        prefix_len=32,
        new_tokens=16,
        dtype=torch.float32,
        iters=5,
        warmup=1,
        serving=ServingShape(),
    ),
    # A 1B-class model (Llama 3.2 1B's attention and MLP shapes, a 32k vocabulary) in bf16.
    "cuda": dict(
        shape=ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, vocab=32000),
        batch=4,
        seq_len=1024,
        prefix_len=64,
        new_tokens=128,
        dtype=torch.bfloat16,
        iters=10,
        warmup=3,
        serving=ServingShape(serve_batch=64, prompt_len=2048),
    ),
}


# ---------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------


def build_base_model(
    model: ModelShape | str | os.PathLike,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    max_positions: int = 4096,
    seed: int = 0,
) -> torch.nn.Module:
    """A causal LM in training mode: random weights for a shape, or a local checkpoint.

    A checkpoint is loaded with ``local_files_only=True``: this never downloads.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    if isinstance(model, ModelShape):
        model.check()
        config = LlamaConfig(
            hidden_size=model.hidden,
            intermediate_size=4 * model.hidden,
            num_hidden_layers=model.layers,
            num_attention_heads=model.heads,
            num_key_value_heads=model.kv_heads,
            vocab_size=model.vocab,
            max_position_embeddings=max_positions,
            pad_token_id=PAD_TOKEN_ID,
        )
        torch.manual_seed(seed)
        # Initialise on the target device: a 1B model initialised on the CPU takes minutes.
        with device:
            base = LlamaForCausalLM(config)
        base.to(dtype)
    else:
        try:
            base = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=dtype).to(device)
        except Exception as exc:  # safetensors, torch and OS errors alike: the checkpoint cannot be read
            raise CheckpointError(f"cannot load {model}: {first_line(exc)}") from exc
    return base.train()


def peft_config(method: str, model_config: Any, prefix_len: int) -> PeftConfig:
    """The PEFT config of ``method`` for a model with ``model_config`` and ``prefix_len`` virtual tokens.

    prefix-tuning: a projection MLP as wide as the model (Li & Liang); p-tuning-v2: learned per-layer
    keys and values, no projection; p-tuning: PEFT's prompt encoder (an MLP) feeding virtual tokens;
    p-tuning-lstm: the same with the LSTM encoder.
    """
    from peft import PrefixTuningConfig, PromptEncoderConfig

    if prefix_len < 1:
        raise ValueError(f"prefix_len must be a positive integer, got {prefix_len}")
    if method == "prefix-tuning":
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_len,
            prefix_projection=True,
            encoder_hidden_size=model_config.hidden_size,
        )
    if method == "p-tuning-v2":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len, prefix_projection=False)
    if method in _P_TUNING_ENCODERS:
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_len,
            encoder_reparameterization_type=_P_TUNING_ENCODERS[method],
            encoder_hidden_size=model_config.hidden_size,
        )
    raise ValueError(f"method must be one of {', '.join((*METHODS, 'p-tuning-lstm'))}; got {method!r}")


# P-tuning's prompt encoder by method name: the bench rows use PEFT's default MLP; the LSTM one is P-tuning's
# original encoder (benchmarks/bench_real.py trains it).
_P_TUNING_ENCODERS = {"p-tuning": "MLP", "p-tuning-lstm": "LSTM"}


def wrap(method: str, base: torch.nn.Module, prefix_len: int) -> PeftModel:
    """``base`` wrapped in a fresh PEFT adapter of ``method`` (the PeftModel, on base's device and dtype)."""
    from peft import get_peft_model

    peft_model = get_peft_model(base, peft_config(method, base.config, prefix_len))
    param = next(base.parameters())
    return peft_model.to(device=param.device, dtype=param.dtype)


def random_batch(
    vocab: int, batch: int, seq_len: int, *, device: torch.device | str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids in ``[1, vocab)`` with left padding on every row but the first.

    Returns ``input_ids`` and ``labels`` [B, T] (long; labels are -100 on padding) and ``attention_mask``
    [B, T] (long, 1 = real token). Row ``b > 0`` has up to ``T // 4`` padding tokens in front, as a batch
    of prompts of different lengths has.
    """
    if vocab < 2:
        raise ValueError(f"vocab must be at least 2 (token 0 is padding), got {vocab}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, seq_len), generator=gen)
    pad = torch.randint(0, seq_len // 4 + 1, (batch,), generator=gen)
    pad[0] = 0
    attention_mask = (torch.arange(seq_len)[None, :] >= pad[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    batch_dict = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: t.to(device) for name, t in batch_dict.items()}


def build_case(
    method: str,
    model: ModelShape | str | os.PathLike,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    batch: int,
    seq_len: int,
    prefix_len: int,
    seed: int = 0,
) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """``(peft_model, batch)``: a fresh base model wrapped with ``method``'s adapter, and a random batch."""
    base = build_base_model(model, device=device, dtype=dtype, max_positions=seq_len + prefix_len, seed=seed)
    peft_model = wrap(method, base, prefix_len)
    return peft_model, random_batch(base.config.vocab_size, batch, seq_len, device=device, seed=seed)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the adapter's trainable parameters (the base model is frozen)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_LEARNING_RATE)


def train_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One optimizer step: forward with labels, backward, AdamW step. Returns the (detached) loss."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def generate_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens per row; returns [B, T + new_tokens] ids."""
    with torch.inference_mode():
        return model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
        )


def peft_prefix_inputs(model: torch.nn.Module, attention_mask: torch.Tensor) -> dict[str, Any]:
    """The base model's inputs that carry a PEFT prefix-tuning adapter the way PEFT hands it over: the prefix
    K/V of every row (PEFT's ``get_prompt``) in a KV cache under the model's cache argument, and
    ``attention_mask`` [B, T] widened to [B, P + T] by ones in front. The base model numbers the tokens after
    its cache, as it does for PEFT. Differentiable: gradients reach the adapter."""
    from fastprompt.hf import compat

    rows = attention_mask.shape[0]
    cache = compat.peft_prefix_cache(model, rows)
    prefix_len = compat.cache_layer_kv(cache)[0][0].shape[2]
    mask = torch.cat([attention_mask.new_ones(rows, prefix_len), attention_mask], dim=1)
    return {"attention_mask": mask, compat.cache_kwarg(model.get_base_model()): cache}


def peft_prefix_generate(model: torch.nn.Module, batch: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """What PEFT's prefix-tuning ``generate`` does, spelled out (:func:`peft_prefix_inputs`), greedy.
    [B, T + new]

    PEFT 0.21's own ``generate`` hands the prefix to transformers 5.24 under a name it no longer reads and
    silently generates without it, so it cannot be the baseline; this is the same work done correctly.
    """
    with torch.inference_mode():
        return model.get_base_model().generate(
            input_ids=batch["input_ids"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
            **peft_prefix_inputs(model, batch["attention_mask"]),
        )


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: the same work timed on the naive path and after ``fastprompt.patch``.

    ``tokens`` is the number of tokens one call processes (training: B * T; generation: B * new tokens;
    scoring: B * query tokens). ``baseline`` names what ``naive`` measured: PEFT's own path for the training
    and generate rows, the best path without fastprompt for a serving row (:data:`BASELINES`).
    ``error`` is set, and the fastprompt figures are missing, when fastprompt refused this case.
    """

    name: str
    kind: str
    tokens: int
    naive: Measurement
    fastprompt: Measurement | None = None
    error: str | None = None
    baseline: str = "peft"

    @property
    def speedup(self) -> float | None:
        return None if self.fastprompt is None else self.naive.ms / self.fastprompt.ms

    @property
    def memory_ratio(self) -> float | None:
        if self.fastprompt is None or self.naive.peak_mib <= 0:
            return None
        return self.fastprompt.peak_mib / self.naive.peak_mib


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict[str, Any]
    rows: list[Row] = field(default_factory=list)


@contextlib.contextmanager
def patched(model: torch.nn.Module) -> Iterator[None]:
    """``model`` patched by fastprompt inside the block, restored after it."""
    import fastprompt

    fastprompt.patch(model)
    try:
        yield
    finally:
        fastprompt.unpatch(model)


def _measure_both(
    model: torch.nn.Module, fn: Callable[[], object], config: BenchConfig, naive_fn: Callable[[], object]
) -> tuple[Measurement, Measurement | None, str | None]:
    """Time ``naive_fn()`` unpatched and ``fn()`` patched, alternating; the patched side reports why fastprompt
    refused. Where the two differ (generation), their greedy tokens must be equal, else nothing is timed."""
    from fastprompt.errors import BackendUnavailableError, UnsupportedModelError

    kwargs = dict(device=config.device, warmup=config.warmup, iters=config.iters)
    try:
        if naive_fn is not fn:
            with patched(model):
                tokens = fn()
            _check_equal("generate vs PEFT's prefix in the cache", tokens, naive_fn())
        naive, fast = measure_pairs(
            [(contextlib.nullcontext, naive_fn), (functools.partial(patched, model), fn)], rounds=ROUNDS, **kwargs
        )
        return naive, fast, None
    except (UnsupportedModelError, BackendUnavailableError) as exc:
        return measure(naive_fn, **kwargs), None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------
# Serving rows: fastprompt's adapter_names against the best path without it
# ---------------------------------------------------------------------------------------------------

BASELINES = {
    "peft": "naive PEFT",
    "peft-prefix-cache": "PEFT's prefix K/V put in the cache by hand (PEFT 0.21's own generate drops it on "
    "transformers 5.24)",
    "prepend": "prompt prepended to every row",
    "copied-cache": "prompt K/V computed once, copied into every row's cache",
    "peft-per-adapter": "PEFT, one batch per adapter",
    "single-adapter": "fastprompt, one adapter for every row",
}
"""What a row's ``naive`` side ran, by :attr:`Row.baseline`."""

_SHARED_PROMPT = "shared-prompt"


def _generate(model: torch.nn.Module, new_tokens: int, **inputs: Any) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens per row; returns [B, new_tokens] ids."""
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
        )
    return out[:, prompt_len:]


def _prepended(prompt: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prompt`` [1, P] in front of every row of a left-padded ``batch`` [B, Q], left-padded again: [B, P + Q]
    ids and mask, and the positions each row takes alone (its first real token is 0)."""
    from fastprompt.prefix.bank import row_position_ids

    rows = batch["input_ids"].shape[0]
    ids = torch.cat([prompt.expand(rows, -1), batch["input_ids"]], dim=1)
    mask = torch.cat([torch.ones_like(prompt).expand(rows, -1), batch["attention_mask"]], dim=1)
    # Sorting each row's mask puts its padding in front: the prompt, then its own tokens, contiguous.
    order = mask.argsort(dim=1, stable=True)
    ids, mask = ids.gather(1, order), mask.gather(1, order)
    positions = row_position_ids(torch.zeros(rows, dtype=torch.int64), mask)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _served_forward(model: torch.nn.Module, names: list[str], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A patched model's scoring forward with one prefix name per row: logits [B, Q, V]."""
    with torch.inference_mode():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=names, use_cache=False
        ).logits


def _check_close(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    from fastprompt.attention.cases import TOLERANCE, max_error, scale_of

    error, limit = max_error(actual, expected), TOLERANCE[actual.dtype].out * scale_of(expected)
    if error > limit:
        raise OutputMismatchError(f"{what}: logits differ by {error:.3g} (allowed {limit:.3g}); not timed")


def _check_equal(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if not torch.equal(actual, expected):
        rows = (actual != expected).any(dim=1).nonzero().flatten().tolist()
        raise OutputMismatchError(f"{what}: generated tokens differ in rows {rows}; not timed")


def _few_shot(config: BenchConfig, base: torch.nn.Module, fast: torch.nn.Module, prompt: torch.Tensor,
              batch: dict[str, torch.Tensor]) -> list[tuple[str, Callable[[], object]]]:
    """(a) Scoring ``batch`` after a cached prompt vs one forward over the prompt prepended to every row."""
    names = [_SHARED_PROMPT] * batch["input_ids"].shape[0]
    prepended = _prepended(prompt, batch)
    query_len = batch["input_ids"].shape[1]

    def prepend() -> torch.Tensor:
        with torch.inference_mode():
            # The best plain forward: logits only for the query columns, no cache.
            return base(**prepended, use_cache=False, logits_to_keep=query_len).logits

    served = _served_forward(fast, names, batch)
    real = batch["attention_mask"].bool()
    _check_close("few-shot vs prepending", served[real], prepend()[real])
    return [("prepend", prepend), ("fastprompt", functools.partial(_served_forward, fast, names, batch))]


def _shared_generate(config: BenchConfig, base: torch.nn.Module, fast: torch.nn.Module, prompt: torch.Tensor,
                     batch: dict[str, torch.Tensor]) -> list[tuple[str, Callable[[], object]]]:
    """(b) Generating after a shared prompt vs its K/V copied into every row's cache, and vs prepending it."""
    from fastprompt.hf import compat
    from fastprompt.hf.soft_prompts import prompt_kv

    new_tokens = config.serving.serve_new_tokens
    rows = batch["input_ids"].shape[0]
    kv = prompt_kv(base, input_ids=prompt)  # [L, 2, Hkv, P, D]
    prepended = _prepended(prompt, batch)
    # The cached columns come first in every row; the queries' own padding stays where it is.
    after_cache = {
        "input_ids": torch.cat([prompt.expand(rows, -1), batch["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.ones_like(prompt).expand(rows, -1), batch["attention_mask"]], dim=1),
    }

    def copied_cache() -> torch.Tensor:
        cache = compat.new_dynamic_cache(base.config)
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        return _generate(base, new_tokens, **after_cache, **{compat.cache_kwarg(base): cache})

    inputs = {"input_ids": prepended["input_ids"], "attention_mask": prepended["attention_mask"]}
    prepend = functools.partial(_generate, base, new_tokens, **inputs)
    served = functools.partial(
        _generate, fast, new_tokens, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        adapter_names=[_SHARED_PROMPT] * rows,
    )
    tokens = served()
    _check_equal("shared-generate vs copied cache", tokens, copied_cache())
    _check_equal("shared-generate vs prepending", tokens, prepend())
    return [("copied-cache", copied_cache), ("prepend", prepend), ("fastprompt", served)]


def _mixed_adapters(config: BenchConfig, base: torch.nn.Module, batch: dict[str, torch.Tensor]
                    ) -> list[tuple[str, Callable[[], object]]]:
    """(c) Scoring a batch whose rows use ``adapters`` prefix-tuning adapters of one PeftModel (``serve_batch /
    adapters`` rows each) in one forward vs PEFT's loop (``set_adapter``, one forward per adapter) and vs
    every row on one adapter (the patched model's ordinary forward).

    A forward, not ``generate``: PEFT's own prefix-tuning ``generate`` hands its prefix to transformers as
    ``past_key_values``, which transformers 5.24 ignores next to the ``cache`` it sets, so its tokens are
    those of the base model and cannot be the check.
    """
    import copy

    from peft import get_peft_model

    import fastprompt

    shape = config.serving
    names = [f"adapter-{i}" for i in range(shape.adapters)]
    adapter_config = peft_config("prefix-tuning", base.config, config.prefix_len)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, adapter_config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, adapter_config)
    param = next(base.parameters())
    peft_model = peft_model.to(device=param.device, dtype=param.dtype).eval()
    peft_model.set_adapter(names[0])
    fast = fastprompt.patch(copy.deepcopy(peft_model))
    per_adapter = batch["input_ids"].shape[0] // shape.adapters
    row_names = [name for name in names for _ in range(per_adapter)]

    def peft_loop() -> torch.Tensor:
        groups = []
        with torch.inference_mode():
            for i, name in enumerate(names):
                peft_model.set_adapter(name)
                group = {k: t[i * per_adapter : (i + 1) * per_adapter] for k, t in batch.items()}
                groups.append(peft_model(**group, use_cache=False).logits)
        peft_model.set_adapter(names[0])
        return torch.cat(groups)

    def single() -> torch.Tensor:
        with torch.inference_mode():
            return fast(**batch, use_cache=False).logits

    mixed = functools.partial(_served_forward, fast, row_names, batch)
    _check_close("mixed-adapters vs PEFT's per-adapter loop", mixed(), peft_loop())
    with torch.inference_mode():
        single_expected = peft_model(**batch, use_cache=False).logits
    _check_close("single adapter vs PEFT", single(), single_expected)
    return [("peft-per-adapter", peft_loop), ("single-adapter", single), ("fastprompt", mixed)]


def _serving_rows(name: str, config: BenchConfig, base: torch.nn.Module) -> list[Row]:
    """The rows of serving case ``name`` on ``base`` (an unpatched eval-mode model): every side's outputs
    are checked first (:class:`OutputMismatchError`), then the sides are timed in alternating rounds."""
    import copy

    import fastprompt

    shape = config.serving
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, vocab, (1, shape.prompt_len), generator=gen).to(config.device)
    batch = random_batch(vocab, shape.serve_batch, shape.query_len, device=config.device, seed=2)
    if name == "mixed-adapters":
        # No padding: PEFT's own positions are then each row's alone, so its loop is a fair oracle.
        batch = {"input_ids": batch["input_ids"].clamp(min=1), "attention_mask": torch.ones_like(batch["input_ids"])}
        sides = _mixed_adapters(config, copy.deepcopy(base), batch)
        kind, tokens = "score", shape.serve_batch * shape.query_len
    else:
        fast = fastprompt.patch(copy.deepcopy(base))
        fastprompt.cache_prompt(fast, _SHARED_PROMPT, prompt)
        make = _few_shot if name == "few-shot" else _shared_generate
        sides = make(config, base, fast, prompt, batch)
        kind = "score" if name == "few-shot" else "generate"
        tokens = shape.serve_batch * (shape.query_len if name == "few-shot" else shape.serve_new_tokens)
    measurers = [
        functools.partial(measure, fn, device=config.device, warmup=config.warmup, iters=config.iters)
        for _, fn in sides
    ]
    measured = dict(zip([label for label, _ in sides], best_of_rounds(measurers, rounds=ROUNDS), strict=True))
    fast_m = measured.pop("fastprompt")
    return [Row(name=name, kind=kind, tokens=tokens, naive=m, fastprompt=fast_m, baseline=label)
            for label, m in measured.items()]


def steps(config: BenchConfig) -> int:
    """How many measurements :func:`run` makes (for a progress bar)."""
    return len(config.rows) + 2


def run(config: BenchConfig, progress: Callable[[str], None] = lambda stage: None) -> BenchResult:
    """Measure every row of ``config``. ``progress(stage)`` is called before each of :func:`steps` stages."""
    if config.device.type == "cpu":
        from fastprompt.attention import cpu_backend

        cpu_backend.prepare()  # the C++ kernels load (or build, first use) while the models are built
    progress("building the model")
    base = build_base_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        max_positions=config.seq_len + config.prefix_len + config.new_tokens,
    )
    batch = random_batch(base.config.vocab_size, config.batch, config.seq_len, device=config.device)
    serving_base = None
    if any(name in SERVING for name in config.rows):
        shape = config.serving
        shape.check()
        serving_base = build_base_model(
            config.model,
            device=config.device,
            dtype=config.dtype,
            max_positions=shape.prompt_len + shape.query_len + shape.serve_new_tokens + config.prefix_len,
        ).eval()
    result = BenchResult(config=config, environment=environment(config.device, config.dtype))
    # Checking the backends builds the C++ kernels on first use: done here, it never lands in a timing.
    progress("loading fastprompt backends")
    from fastprompt.attention import available_backends

    result.environment["backends_available"] = [
        name for name, (ok, _) in available_backends(config.device).items() if ok
    ]
    for name in config.rows:
        progress(f"{name}: naive and fastprompt, alternating")
        if name in SERVING:
            result.rows.extend(_serving_rows(name, config, serving_base))
            continue
        if name == GENERATE:
            peft_model = wrap("prefix-tuning", base, config.prefix_len).eval()
            prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
            fn = functools.partial(generate_step, peft_model, prompt, config.new_tokens)
            naive_fn = functools.partial(peft_prefix_generate, peft_model, prompt, config.new_tokens)
            kind, tokens, baseline = "generate", config.batch * config.new_tokens, "peft-prefix-cache"
        else:
            peft_model = wrap(name, base, config.prefix_len).train()
            # one optimizer for both sides: the rounds alternate on the same model and state
            fn = naive_fn = functools.partial(train_step, peft_model, batch, make_optimizer(peft_model))
            kind, tokens, baseline = "train", config.batch * config.seq_len, "peft"
        naive, fast, error = _measure_both(peft_model, fn, config, naive_fn)
        result.rows.append(Row(name=name, kind=kind, tokens=tokens, naive=naive, fastprompt=fast, error=error,
                               baseline=baseline))
        del peft_model
    return result


# ---------------------------------------------------------------------------------------------------
# Environment: device, versions, commit
# ---------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Installed versions of fastprompt and the libraries it runs on ("not installed" when absent)."""
    result = {}
    for package in ("fastprompt", "torch", "transformers", "peft", "triton"):
        try:
            result[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            result[package] = "not installed"
    return result


def git_commit() -> str:
    """The commit of the fastprompt checkout this package runs from ("-dirty" if modified), else "unknown".

    Only a checkout whose top level holds this very package counts: an installed copy inside some other
    repository (a virtual environment in a project folder) must not report that project's commit.
    """
    package_dir = Path(__file__).resolve().parents[1]  # fastprompt/, this module being fastprompt/cli/bench.py

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package_dir.parent:
            return "unknown"
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def environment(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Device, date, versions, commit, and the attention backend asked for and the one that runs."""
    from fastprompt.attention import resolve_backend
    from fastprompt.errors import BackendUnavailableError

    try:
        backend = resolve_backend(device, dtype)
    except BackendUnavailableError as exc:
        backend = f"unavailable ({exc})"
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "commit": git_commit(),
        "backend_requested": os.environ.get("FASTPROMPT_BACKEND", "auto") or "auto",
        "backend": backend,
    }


def environment_lines(device: torch.device, dtype: torch.dtype, argv: Sequence[str]) -> list[str]:
    """A benchmark table's header lines: device, date, versions, commit, backend and dtype, and the command."""
    env = environment(device, dtype)
    return [
        f"- device: {env['device']}",
        f"- date: {env['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- commit: {env['commit']}",
        f"- backend: {env['backend']} (FASTPROMPT_BACKEND={env['backend_requested']}), dtype: {_dtype_name(dtype)}",
        f"- command: `{shlex.join(['python', *argv])}`",
    ]


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_description(model: ModelShape | Path) -> str:
    return model.describe() if isinstance(model, ModelShape) else f"local checkpoint {model}"


_VERSUS = {
    "prepend": "vs prepending it",
    "copied-cache": "vs its K/V copied per row",
    "peft-per-adapter": "vs PEFT, a batch per adapter",
    "single-adapter": "vs one adapter on all rows",
}


def _row_label(row: Row, config: BenchConfig) -> str:
    shape = config.serving
    versus = _VERSUS.get(row.baseline, "")
    if row.name == "few-shot":
        return f"few-shot scoring, cached {shape.prompt_len}-token prompt, {versus}"
    if row.name == "shared-generate":
        return f"generate after a shared {shape.prompt_len}-token prompt, {versus}"
    if row.name == "mixed-adapters":
        return f"{shape.adapters} prefix-tuning adapters in one batch (scoring), {versus}"
    if row.kind == "generate":
        return f"generate, prefix-tuning ({config.new_tokens} new tokens)"
    return f"{row.name} (train step)"


def _tokens_per_s(row: Row, m: Measurement) -> float:
    return row.tokens / (m.ms / 1e3)


def _serving_lines(result: BenchResult) -> list[str]:
    """The header lines that describe the serving rows, if the run has any."""
    names = [name for name in SERVING if name in result.config.rows]
    if not names:
        return []
    shape = result.config.serving
    return [
        f"- serving rows ({', '.join(names)}): fastprompt's `adapter_names` against the best path without it, "
        f"every side's outputs checked equal (logits within tolerance, identical greedy tokens) before timing, "
        f"all sides alternating for {ROUNDS} rounds; batch {shape.serve_batch} x {shape.query_len} query tokens "
        f"(left padding on some rows, none in mixed-adapters), a {shape.prompt_len}-token shared prompt, "
        f"{shape.serve_new_tokens} new tokens, {shape.adapters} adapters of {result.config.prefix_len} virtual "
        "tokens (prefix tuning with projection); scoring tokens/s counts query tokens",
        "- baselines: " + "; ".join(f"{key}: {text}" for key, text in BASELINES.items() if key != "peft"),
    ]


def format_markdown(result: BenchResult, command: str) -> str:
    """The table with a header naming device, date, versions, commit and ``command``, as markdown."""
    cfg, env = result.config, result.environment
    v = env["versions"]
    lines = [
        f"## fastprompt bench: {env['device_type'].upper()} {env['device']}, {env['date']}",
        "",
        f"- command: `{command}`",
        f"- model: {_model_description(cfg.model)}, {_dtype_name(cfg.dtype)}",
        f"- batch {cfg.batch} x {cfg.seq_len} tokens (left padding on some rows), "
        f"{cfg.prefix_len} virtual tokens; median of {cfg.iters} calls after {cfg.warmup} warm-up, "
        f"naive and fastprompt alternating for {ROUNDS} rounds, the fastest median of each",
        "- generate: greedy; tokens/s counts new tokens, the time includes the prompt's prefill; the naive side is "
        f"{BASELINES['peft-prefix-cache']}, its tokens checked equal to fastprompt's before timing",
        *_serving_lines(result),
        f"- fastprompt {v['fastprompt']} (commit {env['commit']}, attention backend {env['backend']} "
        f"from FASTPROMPT_BACKEND={env['backend_requested']}, "
        f"available here: {', '.join(env.get('backends_available', [])) or 'none'})",
        f"- torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, triton {v['triton']}",
        "",
        "| case | naive tokens/s | fastprompt tokens/s | speed-up | naive peak MiB "
        "| fastprompt peak MiB | memory (fastprompt / naive) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in result.rows:
        naive = f"{_tokens_per_s(row, row.naive):,.0f} | "
        if row.fastprompt is None:
            notes.append(f"- {row.name}: fastprompt refused: {row.error}")
            cells = f"{naive}n/a | n/a | {row.naive.peak_mib:,.1f} | n/a | n/a"
        else:
            memory = "n/a" if row.memory_ratio is None else f"{row.memory_ratio:.2f}x"
            cells = (
                f"{naive}{_tokens_per_s(row, row.fastprompt):,.0f} | {row.speedup:.2f}x | "
                f"{row.naive.peak_mib:,.1f} | {row.fastprompt.peak_mib:,.1f} | {memory}"
            )
        lines.append(f"| {_row_label(row, cfg)} | {cells} |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def to_json(result: BenchResult, command: str) -> dict[str, Any]:
    """Every figure of ``result`` (times in ms, tokens/s, peak MiB, ratios) with config and environment."""
    cfg = result.config

    def figures(row: Row, m: Measurement | None) -> dict[str, float] | None:
        if m is None:
            return None
        return {"ms": m.ms, "tokens_per_s": _tokens_per_s(row, m), "peak_mib": m.peak_mib}

    model = asdict(cfg.model) if isinstance(cfg.model, ModelShape) else {"path": str(cfg.model)}
    return {
        "command": command,
        **result.environment,
        "config": {
            "serving": asdict(cfg.serving),
            "rows": list(cfg.rows),
            "model": model,
            "batch": cfg.batch,
            "seq_len": cfg.seq_len,
            "prefix_len": cfg.prefix_len,
            "new_tokens": cfg.new_tokens,
            "dtype": _dtype_name(cfg.dtype),
            "device": str(cfg.device),
            "iters": cfg.iters,
            "warmup": cfg.warmup,
        },
        "rows": [
            {
                "name": row.name,
                "kind": row.kind,
                "baseline": row.baseline,
                "tokens_per_call": row.tokens,
                "naive": figures(row, row.naive),
                "fastprompt": figures(row, row.fastprompt),
                "speedup": row.speedup,
                "memory_ratio": row.memory_ratio,
                "error": row.error,
            }
            for row in result.rows
        ],
    }


def plot(result: BenchResult, path: str | os.PathLike) -> None:
    """A PNG with two bar charts per row: speed-up and memory ratio, each against the naive path (= 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result.rows if row.fastprompt is not None]
    labels = [row.name for row in rows]
    nan = float("nan")
    panels: Sequence[tuple[str, list[float], str]] = (
        ("speed-up vs naive PEFT (higher is better)", [row.speedup for row in rows], "tab:blue"),
        ("peak memory / naive PEFT (lower is better)", [row.memory_ratio or nan for row in rows], "tab:orange"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (title, values, color) in zip(axes, panels, strict=True):
        bars = ax.bar(labels, values, color=color)
        ax.bar_label(bars, labels=["n/a" if v != v else f"{v:.2f}x" for v in values], padding=2)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_ylim(0, max([1.0, *(v for v in values if v == v)]) * 1.2)
        ax.tick_params(axis="x", labelrotation=15)
    env = result.environment
    fig.suptitle(f"fastprompt bench: {env['device']}, {_dtype_name(result.config.dtype)}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
