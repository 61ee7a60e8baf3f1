"""One optimizer step of prompt-learning training: fastprompt.patch against unpatched PEFT, in one run.

Cases (issue 3):

- ``prefix-tuning``: Llama-shaped decoder, prefix tuning with its projection MLP;
- ``p-tuning-v2``: the same decoder, learned per-layer keys/values (PrefixTuning without projection);
- ``p-tuning-lstm``: the same decoder, P-tuning's LSTM prompt encoder feeding virtual tokens;
- ``bert-p-tuning-v2``: a BERT-shaped sequence classifier ([CLS] head), P-tuning v2.

Each case builds one model, times AdamW steps unpatched (PEFT's path: per-row prefix, cache concat,
4-D mask), then patches the same model object and times them again. Tokens/s counts B * T real-plus-pad
input tokens; peak memory is :func:`fastprompt.bench.timing.measure`'s (CUDA allocator / CPU profiler).

    python benchmarks/bench_train.py                       # CPU, small shapes
    python benchmarks/bench_train.py --preset cuda         # GPU bf16, the issue's target shapes

:func:`build_train_case` and :func:`train_step` are the pieces other tools reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shlex
import sys
from dataclasses import dataclass
from typing import Any

import torch

from fastprompt import bench
from fastprompt.bench.timing import Measurement, measure_alternating

CASES = ("prefix-tuning", "p-tuning-v2", "p-tuning-lstm", "bert-p-tuning-v2")
train_step = bench.train_step


@dataclass(frozen=True)
class EncoderShape:
    """A BERT-shaped encoder; the MLP is ``4 * hidden`` wide."""

    hidden: int
    layers: int
    heads: int
    vocab: int

    def describe(self) -> str:
        return f"random-weight BERT: hidden {self.hidden}, layers {self.layers}, heads {self.heads}"


@dataclass(frozen=True)
class Run:
    """One row of the table: a case at one (batch, seq_len, prefix_len)."""

    case: str
    batch: int
    seq_len: int
    prefix_len: int


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        decoder=bench.ModelShape(hidden=256, layers=4, heads=8, kv_heads=2, vocab=1000),
        encoder=EncoderShape(hidden=256, layers=4, heads=8, vocab=1000),
        runs=[Run("prefix-tuning", 4, 256, 64), Run("p-tuning-v2", 4, 256, 64),
              Run("p-tuning-lstm", 4, 256, 64), Run("bert-p-tuning-v2", 8, 128, 32)],
        dtype=torch.float32, iters=3, warmup=1, rounds=3,
    ),
    "cuda": dict(
        decoder=bench.ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, vocab=32000),
        encoder=EncoderShape(hidden=1024, layers=24, heads=16, vocab=30522),
        runs=[Run("prefix-tuning", 4, 4096, 128), Run("prefix-tuning", 8, 1024, 128),
              Run("p-tuning-v2", 4, 4096, 128), Run("p-tuning-lstm", 4, 4096, 128),
              Run("bert-p-tuning-v2", 32, 128, 128)],
        dtype=torch.bfloat16, iters=10, warmup=3, rounds=1,
    ),
}


def _encoder_classifier(shape: EncoderShape, *, max_positions: int, device: torch.device, dtype: torch.dtype,
                        seed: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
        max_position_embeddings=max_positions, num_labels=2, pad_token_id=bench.PAD_TOKEN_ID,
    )
    torch.manual_seed(seed)
    with device:
        model = BertForSequenceClassification(config)
    return model.to(dtype).train()


def _peft_config(case: str, hidden: int, prefix_len: int) -> Any:
    from peft import PrefixTuningConfig, PromptEncoderConfig

    if case == "p-tuning-lstm":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len,
                                   encoder_reparameterization_type="LSTM", encoder_hidden_size=hidden)
    if case == "bert-p-tuning-v2":
        return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=prefix_len, prefix_projection=False)
    raise ValueError(f"case must be one of {', '.join(CASES)}; got {case!r}")


def build_train_case(
    case: str,
    *,
    batch: int,
    seq_len: int,
    prefix_len: int,
    device: torch.device | str,
    dtype: torch.dtype,
    decoder: bench.ModelShape = PRESETS["cpu"]["decoder"],
    encoder: EncoderShape = PRESETS["cpu"]["encoder"],
    seed: int = 0,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``(peft_model, batch)`` for ``case`` (one of :data:`CASES`): a fresh, unpatched PEFT model.

    Decoder batches have left padding on some rows (``fastprompt.bench.models.random_batch``); the classifier's
    batch has the same padding pattern moved to the right, as a tokenizer pads for BERT, and class labels.
    """
    from peft import get_peft_model

    device = torch.device(device)
    if case in ("prefix-tuning", "p-tuning-v2"):
        return bench.build_case(case, decoder, device, dtype, batch=batch, seq_len=seq_len,
                                prefix_len=prefix_len, seed=seed)
    if case not in CASES:
        raise ValueError(f"case must be one of {', '.join(CASES)}; got {case!r}")
    tokens = bench.random_batch(decoder.vocab if case == "p-tuning-lstm" else encoder.vocab, batch, seq_len,
                                device=device, seed=seed)
    if case == "p-tuning-lstm":
        base = bench.build_base_model(decoder, device=device, dtype=dtype, max_positions=seq_len + prefix_len,
                                      seed=seed)
        hidden = decoder.hidden
    else:
        base = _encoder_classifier(encoder, max_positions=seq_len + prefix_len, device=device, dtype=dtype,
                                   seed=seed)
        hidden = encoder.hidden
        mask = tokens["attention_mask"].flip(1)
        tokens = {
            "input_ids": tokens["input_ids"].flip(1),
            "attention_mask": mask,
            "labels": torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(seed)).to(device),
        }
    peft_model = get_peft_model(base, _peft_config(case, hidden, prefix_len))
    return peft_model.to(device=device, dtype=dtype), tokens


def measure_run(run: Run, *, device: torch.device, dtype: torch.dtype, iters: int, warmup: int, rounds: int,
                decoder: bench.ModelShape, encoder: EncoderShape) -> tuple[Measurement, Measurement]:
    """``(peft, fastprompt)`` measurements of one optimizer step, on the same model object.

    The two sides alternate for ``rounds`` rounds and each keeps its fastest median, so that load from
    other processes on a shared machine (which comes and goes) does not land on one side only.
    """

    model, batch = build_train_case(run.case, batch=run.batch, seq_len=run.seq_len, prefix_len=run.prefix_len,
                                    device=device, dtype=dtype, decoder=decoder, encoder=encoder)
    optimizer = bench.make_optimizer(model)
    peft, fast = measure_alternating(
        lambda: train_step(model, batch, optimizer),
        [contextlib.nullcontext, functools.partial(bench.patched, model)],
        rounds=rounds, device=device, warmup=warmup, iters=iters,
    )
    return peft, fast


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--iters", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--rounds", type=int, help="alternating PEFT/fastprompt rounds; the best of each is kept")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "cuda" else "cpu")
    iters = args.iters or preset["iters"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    rounds = args.rounds or preset["rounds"]
    dtype = preset["dtype"]
    env = bench.environment(device, dtype)
    v = env["versions"]
    lines = [
        f"## bench_train: {device.type.upper()} {env['device']}, {env['date']}",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/bench_train.py', *(argv or sys.argv[1:])])}`",
        f"- decoder: {preset['decoder'].describe()}; classifier: {preset['encoder'].describe()}; "
        f"{str(dtype).removeprefix('torch.')}",
        f"- one AdamW step (forward, backward, step); median of {iters} after {warmup} warm-up, best of {rounds} "
        "alternating rounds; "
        f"commit {env['commit']}, attention backend {env['backend']} (FASTPROMPT_BACKEND={env['backend_requested']})",
        f"- torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}",
        "",
        "| case | B x T, P | PEFT tokens/s | fastprompt tokens/s | speed-up | PEFT peak MiB "
        "| fastprompt peak MiB | memory ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for run in preset["runs"]:
        if run.case not in args.cases:
            continue
        naive, fast = measure_run(run, device=device, dtype=dtype, iters=iters, warmup=warmup, rounds=rounds,
                                  decoder=preset["decoder"], encoder=preset["encoder"])
        tokens = run.batch * run.seq_len
        line = (
            f"| {run.case} | {run.batch} x {run.seq_len}, {run.prefix_len} | {tokens / naive.ms * 1e3:,.0f} "
            f"| {tokens / fast.ms * 1e3:,.0f} | {naive.ms / fast.ms:.2f}x | {naive.peak_mib:,.1f} "
            f"| {fast.peak_mib:,.1f} | {fast.peak_mib / naive.peak_mib:.2f} |"
        )
        lines.append(line)
        print(line, flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
