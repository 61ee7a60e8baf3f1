"""A run's report: the markdown table (committed verbatim under ``benchmarks/results/``), JSON and a chart."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastprompt.bench.attention import BENCH_SHAPE, DECODE_BATCH, DECODE_CACHE, DECODE_PREFIX, TOKENS
from fastprompt.bench.models import ModelShape
from fastprompt.bench.provenance import dtype_name
from fastprompt.bench.suite import ATTENTION, BASELINES, ROUNDS, SERVING, BenchConfig, BenchResult, Row
from fastprompt.bench.timing import Measurement

__all__ = ["format_markdown", "plot", "to_json"]


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


def _attention_lines(result: BenchResult) -> list[str]:
    """The attention rows' own table: the op's times against the naive path and SDPA without the prefix."""
    rows = [row for row in result.rows if row.kind == ATTENTION]
    if not rows:
        return []
    T, P = BENCH_SHAPE
    lines = [
        "",
        f"Attention alone ({dtype_name(result.config.dtype)}): one call of the op on the head geometry of each "
        f"named model, {TOKENS} tokens per call (T = {T}, causal, a prefix of P = {P} shared by the batch) and "
        f"a decode step (B = {DECODE_BATCH}, one query against a cache of {DECODE_CACHE}, P = {DECODE_PREFIX}); "
        f"naive = {BASELINES['naive-attention']}; SDPA without prefix = the same q/k/v with no prefix at all "
        "(plain attention, what a prefix adds to); fastprompt's output checked against the float64 oracle "
        "before timing.",
        "",
        "| case | fastprompt ms | naive ms | SDPA without prefix ms | vs naive | vs SDPA without prefix "
        "| fastprompt peak MiB | naive peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        fast, naive, bare = row.fastprompt, row.naive, row.no_prefix
        lines.append(
            f"| {row.name} | {fast.ms:.2f} | {naive.ms:.2f} | {bare.ms:.2f} | {naive.ms / fast.ms:.2f}x | "
            f"{bare.ms / fast.ms:.2f}x | {fast.peak_mib:,.1f} | {naive.peak_mib:,.1f} |"
        )
    return lines


def format_markdown(result: BenchResult, command: str) -> str:
    """The table with a header naming device, date, versions, commit and ``command``, as markdown."""
    cfg, env = result.config, result.environment
    v = env["versions"]
    lines = [
        f"## fastprompt bench: {env['device_type'].upper()} {env['device']}, {env['date']}",
        "",
        f"- command: `{command}`",
        f"- model: {_model_description(cfg.model)}, {dtype_name(cfg.dtype)}",
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
        if row.kind == ATTENTION:
            continue
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
    lines += _attention_lines(result)
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
            "dtype": dtype_name(cfg.dtype),
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
                "no_prefix": figures(row, row.no_prefix),
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
    fig.suptitle(f"fastprompt bench: {env['device']}, {dtype_name(result.config.dtype)}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
