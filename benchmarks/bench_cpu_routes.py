"""The ``cpu`` backend's two routes side by side: where the cascade (ATen's flash attention over the sequence,
the C++ kernel over the prefix) is faster than the C++ kernel over both, and whether the declared thresholds
of :mod:`fastprompt.attention.cpu_cascade` pick the faster one.

Usage::

    python benchmarks/bench_cpu_routes.py [--iters N] [--rounds N] [--threads N] [--csv PATH]

Every training shape of ``bench_attention.py --full`` (forward and backward), and decode steps (one query
per row, a per-row cache of S tokens, one shared prefix of 512) for each geometry at B in {1, 4, 32} and S in
{128, 512, 2048}, plus the geometry of ``fastprompt bench``'s default model (8 / 2 heads of 32). Each route is
timed alone on the same inputs (median of ``--iters`` calls, the best of ``--rounds`` alternating rounds),
float32 on the CPU. Prints a markdown table (the environment on top) with the route the thresholds take and
its time over the faster route's.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastprompt.attention import AttentionArgs, cpu_backend, cpu_cascade
from fastprompt.attention.cases import make_case
from fastprompt.bench.attention import GEOMETRIES, Case, grid_cases
from fastprompt.bench.provenance import environment_lines
from fastprompt.bench.timing import best_of_rounds, kernel_bench_options, measure, write_csv

DECODE_GEOMETRIES = {**GEOMETRIES, "fastprompt bench default": (8, 2, 32)}
DECODE_BATCHES, DECODE_CACHES, DECODE_PREFIX = (1, 4, 32), (128, 512, 2048), 512
ROUTES = ("cascade", "kernel")


def decode_cases() -> list[Case]:
    return [
        Case(model, B=B, Hq=Hq, Hkv=Hkv, T=1, S=S, P=DECODE_PREFIX, D=D)
        for (model, (Hq, Hkv, D)), B, S in itertools.product(DECODE_GEOMETRIES.items(), DECODE_BATCHES, DECODE_CACHES)
    ]


def call_args(case: Case) -> AttentionArgs:
    """Random inputs of ``case`` (one prefix shared by the batch) as the validated record a backend gets."""
    built = make_case(B=case.B, Hq=case.Hq, Hkv=case.Hkv, T=case.T, S=case.S, P=case.P, N=1, D=case.D,
                      causal=case.causal, requires_grad=False)
    return AttentionArgs(*built.tensors, causal=case.causal).validated()


def route_calls(args: AttentionArgs, backward: bool) -> dict[str, Callable[[], object]]:
    """One call of each route: the forward, or the backward of the whole attention's out and lse."""
    if not backward:
        return {
            "cascade": lambda: cpu_cascade.forward(args),
            "kernel": lambda: torch.ops.fastprompt.prefix_attention_fwd_cpu(*args.flat()),
        }
    out, lse = torch.ops.fastprompt.prefix_attention_fwd_cpu(*args.flat())
    grad_out = torch.randn_like(out)
    return {
        "cascade": lambda: cpu_cascade.backward(args, out, lse, grad_out),
        "kernel": lambda: torch.ops.fastprompt.prefix_attention_bwd_cpu(grad_out, out, lse, None, *args.flat()),
    }


@dataclass(frozen=True)
class Row:
    case: Case
    backward: bool
    ms: dict[str, float]  # route -> median ms
    routed: str  # the route the thresholds take

    @property
    def pass_name(self) -> str:
        return "backward" if self.backward else "forward"

    @property
    def cost_of_routing(self) -> float:
        """The routed time over the faster route's (1.0 = the thresholds picked the faster)."""
        return self.ms[self.routed] / min(self.ms.values())

    def record(self) -> dict[str, object]:
        return {"case": self.case.label, "pass": self.pass_name, **{f"{r}_ms": round(self.ms[r], 4) for r in ROUTES},
                "routed": self.routed, "routed_over_best": round(self.cost_of_routing, 3)}


def run(cases: list[Case], warmup: int, iters: int, rounds: int) -> list[Row]:
    cpu_backend.load()
    rows = []
    for number, case in enumerate(cases, 1):
        args = call_args(case)
        for backward in (False, True) if case.trains else (False,):
            calls = route_calls(args, backward)
            timed = best_of_rounds(
                [functools.partial(measure, calls[r], device="cpu", warmup=warmup, iters=iters) for r in ROUTES],
                rounds=rounds,
            )
            cascade = cpu_cascade.runs_backward(args) if backward else cpu_cascade.runs_forward(args)
            rows.append(Row(case, backward, {r: m.ms for r, m in zip(ROUTES, timed, strict=True)},
                            "cascade" if cascade else "kernel"))
            print(f"  [{number}/{len(cases)}] {case.label} {rows[-1].pass_name}", file=sys.stderr, flush=True)
    return rows


def format_report(rows: list[Row], argv: list[str]) -> str:
    costs = sorted(row.cost_of_routing for row in rows)
    wrong = [row for row in rows if row.cost_of_routing > 1.0]
    lines = [
        "# cpu backend: the cascade against the C++ kernel alone, and the route the thresholds take",
        "",
        *environment_lines(torch.device("cpu"), torch.float32, argv),
        "",
        f"Thresholds: the cascade for bidirectional forwards with S >= {cpu_cascade.FORWARD_MIN_KEYS}, "
        f"bidirectional backwards with S >= {cpu_cascade.BACKWARD_MIN_KEYS} and decode steps whose GQA group is "
        f"<= {cpu_cascade.DECODE_MAX_GROUP} heads with B * S >= {cpu_cascade.DECODE_MIN_KEYS}; the C++ kernel "
        "for the rest.",
        "",
        f"{len(rows)} rows; the routed route is the faster on {len(rows) - len(wrong)}; where it is not, it takes "
        f"{costs[-1]:.2f}x the faster's time at worst (median over those rows "
        f"{sorted(r.cost_of_routing for r in wrong)[len(wrong) // 2] if wrong else 1.0:.2f}x).",
        "",
        "| case | pass | cascade ms | C++ kernel ms | routed | routed / faster |",
        "|---|---|---:|---:|---|---:|",
    ]
    for row in rows:
        lines.append(f"| {row.case.label} | {row.pass_name} | {row.ms['cascade']:.3f} | {row.ms['kernel']:.3f} | "
                     f"{row.routed} | {row.cost_of_routing:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, _, iters = kernel_bench_options(__doc__.split("\n\n")[0], argv, warmup=2, iters=(9, 20), csv=True)
    if args.device != "cpu":
        raise SystemExit("bench_cpu_routes.py measures the cpu backend: --device cpu")
    cases = [case for case in grid_cases(full=True) if case.trains] + decode_cases()
    rows = run(cases, args.warmup, iters, args.rounds)
    print(format_report(rows, ["benchmarks/bench_cpu_routes.py", *argv]))
    if args.csv:
        write_csv(args.csv, [row.record() for row in rows])


if __name__ == "__main__":
    main()
