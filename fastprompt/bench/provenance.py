"""Where a measurement was made: device, date, versions, commit and backend, for every table's header."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["device_name", "dtype_name", "environment", "environment_lines", "git_commit", "versions"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    package_dir = Path(__file__).resolve().parents[1]  # fastprompt/, this module being fastprompt/bench/provenance.py

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


def environment_lines(device: torch.device, dtype: torch.dtype, argv: Sequence[str]) -> list[str]:
    """A benchmark table's header lines: device, date, versions, commit, backend and dtype, and the command."""
    env = environment(device, dtype)
    return [
        f"- device: {env['device']}",
        f"- date: {env['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items())}",
        f"- commit: {env['commit']}",
        f"- backend: {env['backend']} (FASTPROMPT_BACKEND={env['backend_requested']}), dtype: {dtype_name(dtype)}",
        f"- command: `{shlex.join(['python', *argv])}`",
    ]
