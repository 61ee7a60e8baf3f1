"""Prompt-encoder benchmark: one encoder forward+backward, fastprompt vs PEFT's modules at PEFT's sizes.

Usage::

    python benchmarks/bench_encoders.py [--device cpu|cuda] [--dtype float32|bfloat16] [--iters N] [--rounds N]
                                        [--small]

Cases: Prefix-Tuning's MLP for a 2048-hidden, 16-layer model with 8 KV heads of 128 (kv_dim 1024,
``Linear(1024→1024) → Tanh → Linear(1024→16·2·1024)``), P=128, where PEFT runs the MLP on every batch row
(``get_prompt`` expands the tokens to the batch) at batch 1 and 16 while fastprompt runs it once; and
P-tuning's 2-layer bidirectional LSTM + MLP head at hidden 2048, P=20 and P=100 (PEFT already runs this
one once per step). Prints a markdown table with device, date, commit and command on top; ratios are
PEFT time / fastprompt time measured in the same run. ``--small`` shrinks every size by 8 for a smoke run.

The builders (:func:`cases`, :func:`build`, :func:`fastprompt_step`, :func:`peft_step`) are reused by
``benchmarks/test_bench_encoders.py``.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from dataclasses import dataclass

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig
from peft.tuners.p_tuning.model import PromptEncoder
from peft.tuners.prefix_tuning.model import PrefixEncoder

from fastprompt.bench.provenance import environment
from fastprompt.bench.timing import Measurement, best_of_rounds, measure
from fastprompt.encoders import encode_prompt, resolve_encoder_backend


@dataclass(frozen=True)
class Case:
    """``kind`` "prefix" (MLP projection) or "lstm" (P-tuning LSTM + MLP); PEFT runs ``batch`` rows."""

    kind: str
    P: int
    token_dim: int
    hidden: int
    layers: int  # transformer layers (prefix) or LSTM layers (lstm)
    batch: int = 1

    @property
    def label(self) -> str:
        if self.kind == "prefix":
            return (f"prefix MLP {self.token_dim}→{self.hidden}→{self.layers}·2·{self.token_dim}, "
                    f"P={self.P}, batch {self.batch}")
        return f"P-tuning LSTM×{self.layers} + MLP, hidden {self.hidden}, P={self.P}"


def cases(small: bool = False) -> list[Case]:
    s = 8 if small else 1
    prefix = Case("prefix", P=128 // s, token_dim=1024 // s, hidden=1024 // s, layers=16)
    lstm = Case("lstm", P=20, token_dim=2048 // s, hidden=2048 // s, layers=2)
    return [prefix, Case(**{**prefix.__dict__, "batch": 16}), lstm, Case(**{**lstm.__dict__, "P": 100 // s})]


def build(case: Case, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The PEFT module with random weights (never zero-initialised), in training mode."""
    if case.kind == "prefix":
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=case.P, token_dim=case.token_dim,
            encoder_hidden_size=case.hidden, prefix_projection=True, num_layers=case.layers,
            num_attention_heads=8, num_transformer_submodules=1,
        )
        module = PrefixEncoder(config)
    else:
        config = PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=case.P, token_dim=case.token_dim,
            encoder_hidden_size=case.hidden, encoder_reparameterization_type="LSTM",
            encoder_num_layers=case.layers, num_transformer_submodules=1,
        )
        module = PromptEncoder(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.to(device, dtype).train()


def fastprompt_step(module: torch.nn.Module, case: Case, grad: torch.Tensor) -> torch.Tensor:
    """One encoder forward+backward the fastprompt way: once, whatever the batch (grad [P, O])."""
    tokens = torch.arange(case.P, device=grad.device)
    out = encode_prompt(module, tokens)
    out.backward(grad)
    return out


def peft_step(module: torch.nn.Module, case: Case, grad: torch.Tensor) -> torch.Tensor:
    """PEFT's ``get_prompt``: the prefix encoder on ``batch`` copies of the tokens; P-tuning on one row."""
    rows = case.batch if case.kind == "prefix" else 1
    tokens = torch.arange(case.P, device=grad.device)[None].expand(rows, -1)
    out = module(tokens)
    out.backward(grad[None].expand(rows, -1, -1))
    return out


def _measure(step, module: torch.nn.Module, case: Case, grad: torch.Tensor, device: str, iters: int) -> Measurement:
    m = measure(functools.partial(step, module, case, grad), device=device, warmup=1, iters=iters)
    module.zero_grad(set_to_none=True)
    return m


def run(device: str, dtype: torch.dtype, iters: int, small: bool, rounds: int = 3) -> list[dict]:
    """Each row: fastprompt and PEFT measured in turn for ``rounds`` rounds, the best of each kept."""
    rows = []
    for case in cases(small):
        module = build(case, dtype, device)
        with torch.no_grad():
            width = module(torch.arange(case.P, device=device)[None]).shape[-1]
        grad = torch.randn(case.P, width, device=device, dtype=dtype)
        fast, peft = best_of_rounds(
            [functools.partial(_measure, step, module, case, grad, device, iters)
             for step in (fastprompt_step, peft_step)],
            rounds=rounds,
        )
        result = {"case": case.label, "fastprompt": fast, "peft": peft}
        rows.append(result)
        print(_row(result), flush=True)
    return rows


def _row(r: dict) -> str:
    f, p = r["fastprompt"], r["peft"]
    return (f"| {r['case']} | {f.ms:.2f} | {p.ms:.2f} | {p.ms / f.ms:.2f}x | "
            f"{f.peak_mib:.1f} | {p.peak_mib:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating fastprompt/PEFT rounds; best of each kept")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    env = environment(torch.device(args.device), dtype)
    print(f"# Prompt encoders, forward+backward ({args.dtype})\n")
    print(f"- device: {env['device']}\n- date: {env['date']}\n- commit: {env['commit']}")
    backend = resolve_encoder_backend(None, torch.device(args.device), dtype)
    print(f"- encoder backend: {backend} (FASTPROMPT_BACKEND={env['backend_requested']})")
    print(f"- command: `python {shlex.join(sys.argv)}`\n")
    print("Median time per call, the better of alternating rounds for each side.\n")
    print("| case | fastprompt ms | PEFT ms | PEFT / fastprompt | fastprompt peak MiB | PEFT peak MiB |")
    print("|---|---|---|---|---|---|")
    run(args.device, dtype, args.iters, args.small, args.rounds)


if __name__ == "__main__":
    main()
