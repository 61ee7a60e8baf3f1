"""One way to time a call and to measure its peak memory, used by every benchmark and by ``fastprompt bench``.

Time: median wall time over ``iters`` calls after ``warmup`` calls, with the device synchronised around
each call. Peak memory: the most bytes the call held allocated above what was allocated before it,
from the CUDA caching allocator's statistics on CUDA, and from the profiler's allocation events on CPU
(the CPU allocator keeps no statistics). Memory is measured in one separate call, so the profiler's
overhead never reaches the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    """``ms``: median milliseconds per call; ``peak_mib``: peak MiB allocated by one call."""

    ms: float
    peak_mib: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler prints start/stop lines on file descriptor 2; keep tables clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    iters: int = 5,
) -> Measurement:
    """Time ``fn()`` and measure its peak memory on ``device``.

    ``fn`` takes no arguments; whatever it returns is dropped after the call (return the outputs so
    that their memory counts while they are alive, as a training step's would).
    """
    device = torch.device(device)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = _cuda_peak_bytes(fn, device) if device.type == "cuda" else _cpu_peak_bytes(fn)
    return Measurement(ms=1e3 * statistics.median(times), peak_mib=peak / 2**20)


def best_of_rounds(measurers: Sequence[Callable[[], Measurement]], *, rounds: int = 3) -> list[Measurement]:
    """Call each of ``measurers`` (each one measurement of one side, e.g. fastprompt and the naive path) in
    turn for ``rounds`` rounds; each side keeps its fastest measurement, so that load from other processes,
    which comes and goes, does not land on one side only. Returns one per side, in order."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    best: list[Measurement | None] = [None] * len(measurers)
    for _ in range(rounds):
        for i, measurer in enumerate(measurers):
            m = measurer()
            if best[i] is None or m.ms < best[i].ms:
                best[i] = m
    return best


def measure_alternating(
    fn: Callable[[], object],
    sides: Sequence[Callable[[], contextlib.AbstractContextManager]],
    *,
    rounds: int = 3,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    iters: int = 5,
) -> list[Measurement]:
    """Time ``fn()`` under each of ``sides`` (context-manager factories, e.g. unpatched and patched) in turn,
    as :func:`best_of_rounds` does; entering and leaving a side is not timed. Returns one per side."""
    return measure_pairs([(side, fn) for side in sides], rounds=rounds, device=device, warmup=warmup, iters=iters)


def measure_pairs(
    pairs: Sequence[tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], object]]],
    *,
    rounds: int = 3,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    iters: int = 5,
) -> list[Measurement]:
    """Time each ``(side, fn)`` pair's ``fn()`` under its ``side()`` context in turn, as :func:`best_of_rounds`
    does (sides whose work differs, e.g. PEFT's path unpatched and fastprompt's patched). One per pair."""

    def under(side: Callable[[], contextlib.AbstractContextManager], fn: Callable[[], object]) -> Measurement:
        with side():
            return measure(fn, device=device, warmup=warmup, iters=iters)

    return best_of_rounds([functools.partial(under, side, fn) for side, fn in pairs], rounds=rounds)


def kernel_bench_options(
    description: str,
    argv: Sequence[str],
    *,
    warmup: int,
    iters: tuple[int, int],
    csv: bool = False,
    switches: Sequence[tuple[str, str]] = (),
) -> tuple[argparse.Namespace, torch.dtype, int]:
    """The command line the kernel benchmarks share: ``--device --dtype --warmup --iters --rounds --threads``
    (and ``--csv PATH`` with ``csv``, and a boolean ``--<name>`` per ``(name, help)`` of ``switches``). Sets
    the thread count; returns the arguments, the dtype (bfloat16 on CUDA, float32 on CPU unless given) and the
    timed calls per measurement (``iters`` = (CPU, CUDA) default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--iters", type=int, default=None,
                        help=f"timed calls per measurement (default {iters[0]} cpu, {iters[1]} cuda)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if csv:
        parser.add_argument("--csv", metavar="PATH", help="also write every row to this CSV file")
    for name, help_text in switches:
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
    args = parser.parse_args(list(argv))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args, dtype, args.iters or iters[args.device == "cuda"]


def write_csv(path: str | os.PathLike, records: Sequence[dict[str, object]]) -> None:
    """The ``--csv`` file of a kernel benchmark: one row per record, the first record's keys as the header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
