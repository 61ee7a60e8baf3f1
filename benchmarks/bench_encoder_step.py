"""One P-tuning v2 training step on BERT-shaped encoders: fastprompt.patch against PEFT's prefix in the KV cache.

Random-weight ``BertForSequenceClassification`` models in the shapes of all-MiniLM-L6-v2 (hidden 384, 6
layers, 12 heads of 32) and BERT-base (hidden 768, 12 layers, 12 heads of 64), each with PEFT's P-tuning v2
adapter (``PrefixTuningConfig`` without projection, SEQ_CLS). PEFT's side hands the adapter's prefix to the
base model through its KV cache, as PEFT did before its own forward refused BERT prefix tuning
(``benchmarks/bench_real.py``: :func:`peft_prefix_classifier_scores`); fastprompt's side is the patched
model's own forward. Both train the same model object with one Adam state each, on one batch of ``--batch``
rows of ``--seq-len`` tokens (right padding of up to a quarter of the row), and are timed in turn
(:func:`fastprompt.bench.timing.measure_pairs`) after a check that their losses agree.

    python benchmarks/bench_encoder_step.py [--models minilm-l6,bert-base] [--batch 16] [--seq-len 128]
                                            [--prefix-len 32] [--iters 5] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

import torch
from bench_real import classifier_scores, peft_prefix_classifier_scores

from fastprompt import bench
from fastprompt.bench.provenance import environment_lines
from fastprompt.bench.timing import measure_pairs

SHAPES = {
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def build(name: str, prefix_len: int, seq_len: int) -> torch.nn.Module:
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, max_position_embeddings=max(512, seq_len), num_labels=2, **SHAPES[name])
    base = BertForSequenceClassification(config).eval()  # eval: no dropout, so both sides do the same work
    return get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=prefix_len))


def batch_of(rows: int, seq_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(3 * seq_len // 4, seq_len + 1, (rows,), generator=generator)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (rows, seq_len), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=generator)}


def step(model: torch.nn.Module, scores, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = torch.nn.functional.cross_entropy(scores(model, batch), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lines = [
        "| model | PEFT (prefix in the KV cache) ms | fastprompt ms | speed-up | PEFT peak MiB | fastprompt peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build(name, args.prefix_len, args.seq_len)
        batch = batch_of(args.batch, args.seq_len, torch.Generator().manual_seed(0))
        with torch.no_grad():
            peft_logits = peft_prefix_classifier_scores(model, batch)
            with bench.patched(model):
                fast_logits = classifier_scores(model, batch)
        torch.testing.assert_close(fast_logits, peft_logits, rtol=1e-4, atol=1e-4)
        trainable = [p for p in model.parameters() if p.requires_grad]
        peft_step = functools.partial(step, model, peft_prefix_classifier_scores, torch.optim.Adam(trainable), batch)
        fast_step = functools.partial(step, model, classifier_scores, torch.optim.Adam(trainable), batch)
        peft, fast = measure_pairs(
            [(contextlib.nullcontext, peft_step), (functools.partial(bench.patched, model), fast_step)],
            rounds=args.rounds, warmup=1, iters=args.iters,
        )
        lines.append(f"| {name} | {peft.ms:.1f} | {fast.ms:.1f} | {peft.ms / fast.ms:.2f}x | {peft.peak_mib:.1f} | "
                     f"{fast.peak_mib:.1f} |")
        print(f"  measured {name}", file=sys.stderr, flush=True)
    print("# P-tuning v2 training step on BERT-shaped encoders: fastprompt vs PEFT's prefix in the KV cache")
    print()
    print("\n".join(environment_lines(torch.device("cpu"), torch.float32, ["benchmarks/bench_encoder_step.py", *argv])))
    print()
    print(f"Batch {args.batch} x {args.seq_len} tokens (right padding), {args.prefix_len} virtual tokens, float32, "
          "random weights; median of each side's best round (fastprompt.bench.timing.measure_pairs).")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
