"""The benchmark behind ``fastprompt bench``: fastprompt against the naive PEFT path, measured in one run.

- :class:`BenchConfig` and :data:`DEFAULTS`: what a run measures, per device type;
- :func:`run`: every requested row, naive and patched on the same model object, alternating for
  :data:`ROUNDS` rounds (:func:`fastprompt.bench.timing.best_of_rounds`), each side's fastest kept;
- the serving rows (:data:`SERVING`, opt-in through ``rows``): fastprompt's ``adapter_names`` against the
  best a user can do without it, each side's outputs checked equal before anything is timed.

The cases come from :mod:`.models`, the timed work from :mod:`.work`; :mod:`.report` prints the result.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprompt.bench import attention
from fastprompt.bench.models import (
    METHODS,
    PAD_TOKEN_ID,
    ModelShape,
    build_base_model,
    peft_config,
    random_batch,
    wrap,
)
from fastprompt.bench.provenance import environment
from fastprompt.bench.timing import Measurement, best_of_rounds, measure, measure_pairs
from fastprompt.bench.work import generate_step, make_optimizer, peft_prefix_generate, train_step

__all__ = [
    "ATTENTION", "BASELINES", "DEFAULTS", "DEFAULT_ROWS", "GENERATE", "ROUNDS", "ROWS", "SERVING", "BenchConfig",
    "BenchResult", "OutputMismatchError", "Row", "ServingShape", "patched", "run", "steps",
]

GENERATE = "generate"
ATTENTION = "attention"
"""The op alone on real models' head geometries (:func:`fastprompt.bench.attention.bench_cases`)."""
SERVING = ("few-shot", "shared-generate", "mixed-adapters")
"""Serving rows: a cached few-shot prompt (scoring), a shared prompt (generate), many adapters in one batch."""
DEFAULT_ROWS = (*METHODS, GENERATE, ATTENTION)
"""What a run without ``--methods`` measures; the serving rows take minutes on a CPU and are opt-in."""
ROWS = (*DEFAULT_ROWS, *SERVING)


class OutputMismatchError(RuntimeError):
    """fastprompt and a baseline gave different outputs for the same work: nothing of that row is timed."""


ROUNDS = 3
"""Naive and patched alternate this many times per row; each keeps its fastest median (load comes and goes)."""


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
# Measuring
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: the same work timed on the naive path and after ``fastprompt.patch``.

    ``tokens`` is the number of tokens one call processes (training: B * T; generation: B * new tokens;
    scoring: B * query tokens). ``baseline`` names what ``naive`` measured: PEFT's own path for the training
    and generate rows, the best path without fastprompt for a serving row (:data:`BASELINES`).
    ``error`` is set, and the fastprompt figures are missing, when fastprompt refused this case.
    An attention row (``kind`` :data:`ATTENTION`) times one call of the op; ``tokens`` counts its queries and
    ``no_prefix`` is SDPA on the same q/k/v without the prefix.
    """

    name: str
    kind: str
    tokens: int
    naive: Measurement
    fastprompt: Measurement | None = None
    error: str | None = None
    baseline: str = "peft"
    no_prefix: Measurement | None = None

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
    "naive-attention": "the naive path of one attention call: the prefix expanded per row, concatenated onto K/V, "
    "a 4-D mask, SDPA",
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


def _attention_rows(config: BenchConfig) -> list[Row]:
    """The op on :func:`fastprompt.bench.attention.bench_cases` in the run's dtype and device: fastprompt, the
    naive path and SDPA without the prefix in turn for :data:`ROUNDS` rounds, after a check of fastprompt's
    output against the float64 oracle."""
    device = config.device.type
    rows = []
    for case in attention.bench_cases():
        attention.check_against_reference(case, config.dtype, device)
        for mode in attention.MODES if case.trains else attention.MODES[:1]:
            fast, naive, no_prefix = best_of_rounds(
                [
                    functools.partial(attention.timed, call, case, mode, config.dtype, device, config.warmup,
                                      config.iters)
                    for call in attention.CALLS.values()
                ],
                rounds=ROUNDS,
            )
            rows.append(Row(name=f"{case.label}, {mode}", kind=ATTENTION, tokens=case.B * case.T, naive=naive,
                            fastprompt=fast, baseline="naive-attention", no_prefix=no_prefix))
    return rows


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
        if name == ATTENTION:
            result.rows.extend(_attention_rows(config))
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
