"""The benchmark behind ``fastprompt bench``: fastprompt against the naive PEFT path, measured in one run.

The pieces are reusable on their own (``benchmarks/`` builds its cases with them):

- :func:`build_base_model`: a random-weight Llama-shaped model from a :class:`ModelShape`, or a local
  checkpoint directory (never downloaded);
- :func:`peft_config` / :func:`wrap`: the PEFT adapter of each method;
- :func:`random_batch`: random token ids with realistic left padding;
- :func:`build_case`: the three above in one call, ``(peft_model, batch)``;
- :func:`train_step` and :func:`generate_step`: the work that is timed;
- :func:`run`: every requested row, naive and patched on the same model object, alternating for
  :data:`ROUNDS` rounds (:func:`fastprompt.cli.benchutil.measure_alternating`), each side's fastest kept;
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
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fastprompt.cli.benchutil import Measurement, measure, measure_alternating

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

METHODS = ("prefix-tuning", "p-tuning-v2", "p-tuning")
"""Training rows: prefix-tuning with its projection MLP, P-tuning v2 (deep prompts), P-tuning."""
GENERATE = "generate"
ROWS = (*METHODS, GENERATE)

PAD_TOKEN_ID = 0


class CheckpointError(ValueError):
    """A local checkpoint given with ``--model`` that cannot be loaded."""


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
            raise CheckpointError(
                f"cannot load {model}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from exc
    return base.train()


def peft_config(method: str, model_config: Any, prefix_len: int) -> PeftConfig:
    """The PEFT config of ``method`` for a model with ``model_config`` and ``prefix_len`` virtual tokens.

    prefix-tuning: a projection MLP as wide as the model (Li & Liang); p-tuning-v2: learned per-layer
    keys and values, no projection; p-tuning: PEFT's prompt encoder (an MLP) feeding virtual tokens.
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
    if method == "p-tuning":
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix_len,
            encoder_reparameterization_type="MLP",
            encoder_hidden_size=model_config.hidden_size,
        )
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


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


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: the same work timed on the naive path and after ``fastprompt.patch``.

    ``tokens`` is the number of tokens one call processes (training: B * T; generation: B * new tokens).
    ``error`` is set, and the fastprompt figures are missing, when fastprompt refused this case.
    """

    name: str
    kind: str
    tokens: int
    naive: Measurement
    fastprompt: Measurement | None = None
    error: str | None = None

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
    model: torch.nn.Module, fn: Callable[[], object], config: BenchConfig
) -> tuple[Measurement, Measurement | None, str | None]:
    """Time ``fn()`` unpatched and patched, alternating; the patched side reports why fastprompt refused."""
    from fastprompt.errors import BackendUnavailableError, UnsupportedModelError

    kwargs = dict(device=config.device, warmup=config.warmup, iters=config.iters)
    try:
        naive, fast = measure_alternating(
            fn, [contextlib.nullcontext, functools.partial(patched, model)], rounds=ROUNDS, **kwargs
        )
        return naive, fast, None
    except (UnsupportedModelError, BackendUnavailableError) as exc:
        return measure(fn, **kwargs), None, f"{type(exc).__name__}: {exc}"


def steps(config: BenchConfig) -> int:
    """How many measurements :func:`run` makes (for a progress bar)."""
    return len(config.rows) + 2


def run(config: BenchConfig, progress: Callable[[str], None] = lambda stage: None) -> BenchResult:
    """Measure every row of ``config``. ``progress(stage)`` is called before each of :func:`steps` stages."""
    progress("building the model")
    base = build_base_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        max_positions=config.seq_len + config.prefix_len + config.new_tokens,
    )
    batch = random_batch(base.config.vocab_size, config.batch, config.seq_len, device=config.device)
    result = BenchResult(config=config, environment=environment(config.device, config.dtype))
    # Checking the backends builds the C++ kernels on first use: done here, it never lands in a timing.
    progress("loading fastprompt backends")
    from fastprompt.attention import available_backends

    result.environment["backends_available"] = [
        name for name, (ok, _) in available_backends(config.device).items() if ok
    ]
    for name in config.rows:
        progress(f"{name}: naive and fastprompt, alternating")
        if name == GENERATE:
            peft_model = wrap("prefix-tuning", base, config.prefix_len).eval()
            prompt = {k: batch[k] for k in ("input_ids", "attention_mask")}
            fn = functools.partial(generate_step, peft_model, prompt, config.new_tokens)
            kind, tokens = "generate", config.batch * config.new_tokens
        else:
            peft_model = wrap(name, base, config.prefix_len).train()
            # one optimizer for both sides: the rounds alternate on the same model and state
            fn = functools.partial(train_step, peft_model, batch, make_optimizer(peft_model))
            kind, tokens = "train", config.batch * config.seq_len
        naive, fast, error = _measure_both(peft_model, fn, config)
        result.rows.append(Row(name=name, kind=kind, tokens=tokens, naive=naive, fastprompt=fast, error=error))
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
    package_dir = Path(__file__).resolve().parents[1]  # fastprompt/, above this cli/ subpackage

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


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_description(model: ModelShape | Path) -> str:
    return model.describe() if isinstance(model, ModelShape) else f"local checkpoint {model}"


def _row_label(row: Row, config: BenchConfig) -> str:
    if row.kind == "generate":
        return f"generate, prefix-tuning ({config.new_tokens} new tokens)"
    return f"{row.name} (train step)"


def _tokens_per_s(row: Row, m: Measurement) -> float:
    return row.tokens / (m.ms / 1e3)


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
        "- generate: greedy; tokens/s counts new tokens, the time includes the prompt's prefill",
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
