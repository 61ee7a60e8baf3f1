"""The ``fastprompt`` command: ``fastprompt bench`` (how much faster, here) and ``fastprompt info``.

Bad options end with one line, ``fastprompt: error: ...``, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from fastprompt.bench.provenance import environment
from fastprompt.cli import bench


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fastprompt: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastprompt",
        description="fastprompt: fused kernels for prompt-based tuning on Hugging Face transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,info}")
    bench.add_parser(commands)
    commands.add_parser(
        "info",
        help="which attention and prompt encoder backends are available here, and why not",
        description="Print versions, the device, and for each backend of the attention op and of the prompt "
        "encoders whether it can run.",
    )
    return parser


def _run_info() -> int:
    from fastprompt.attention import available_backends
    from fastprompt.encoders import available_encoder_backends

    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    lines = [
        f"versions: {versions}",
        f"commit: {env['commit']}",
        f"device: {env['device_type']} ({env['device']})",
        f"FASTPROMPT_BACKEND: {env['backend_requested']} (attention backend for float32 here: {env['backend']})",
    ]
    if sys.stderr.isatty():
        print("checking backends (the first check compiles the C++ kernels)...", file=sys.stderr)
    for device in ("cuda", "cpu"):
        lines += ["", f"attention backends for {device} tensors:"]
        for name, (ok, reason) in available_backends(device).items():
            lines.append(f"  {name:<7} {'yes' if ok else 'no ':<4} {reason}")
    for device in ("cuda", "cpu"):
        lines += ["", f"prompt encoder backends for {device} tensors:"]
        for name, (ok, reason) in available_encoder_backends(device).items():
            lines.append(f"  {name:<7} {'yes' if ok else 'no ':<4} {reason}")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastprompt`` console script and of ``python -m fastprompt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(parser, args, shlex.join(["fastprompt", *argv]))
    return _run_info()
