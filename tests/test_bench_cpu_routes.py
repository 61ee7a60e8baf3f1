"""``benchmarks/bench_cpu_routes.py`` on tiny cases: both routes timed, the route the thresholds take recorded,
the report and the CSV written from the same rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cpu_routes  # noqa: E402

from fastprompt.attention import available_backends, cpu_cascade  # noqa: E402
from fastprompt.bench.attention import Case  # noqa: E402
from fastprompt.bench.timing import write_csv  # noqa: E402


def test_routes_are_timed_and_the_routed_one_named(tmp_path):
    ok, reason = available_backends("cpu")["cpu"]
    if not ok:
        pytest.skip(f"cpu backend unavailable: {reason}")
    cases = [
        Case("tiny", B=2, Hq=4, Hkv=2, T=8, S=8, P=3, D=32, causal=False),
        Case("tiny", B=3, Hq=2, Hkv=2, T=1, S=9, P=5, D=32),
    ]
    rows = bench_cpu_routes.run(cases, warmup=0, iters=1, rounds=1)
    assert [(row.case, row.pass_name) for row in rows] == [
        (cases[0], "forward"), (cases[0], "backward"), (cases[1], "forward")
    ]
    for row in rows:
        args = bench_cpu_routes.call_args(row.case)
        cascade = cpu_cascade.runs_backward(args) if row.backward else cpu_cascade.runs_forward(args)
        assert row.routed == ("cascade" if cascade else "kernel")
        assert all(ms > 0 for ms in row.ms.values()) and row.cost_of_routing >= 1.0
    report = bench_cpu_routes.format_report(rows, ["benchmarks/bench_cpu_routes.py"])
    assert f"{len(rows)} rows; the routed route is the faster on" in report
    assert report.count("| tiny ") == len(rows)
    path = tmp_path / "routes.csv"
    write_csv(path, [row.record() for row in rows])
    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["routed"] for r in written] == [row.routed for row in rows]
