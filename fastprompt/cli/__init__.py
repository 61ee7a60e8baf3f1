"""The ``fastprompt`` command: ``fastprompt bench`` (how much faster, here), ``fastprompt info`` and
``fastprompt serve`` (vLLM's OpenAI-compatible server with prompt-learning adapters).

Bad options end with one line, ``fastprompt: error: ...``, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from fastprompt.bench.provenance import environment
from fastprompt.cli import bench
from fastprompt.errors import first_line


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fastprompt: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastprompt",
        description="fastprompt: fused kernels for prompt-based tuning on Hugging Face transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,info,serve}")
    bench.add_parser(commands)

    serve = commands.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server with prompt-learning adapters selected by model=NAME",
        description=(
            "Start vLLM's OpenAI-compatible server on MODEL, serving each --adapter as a model of its own name "
            "(/v1/completions, /v1/chat/completions, streaming; /v1/models lists them). Needs vLLM (see README, "
            "'Serving with vLLM'). Every option not listed here is vLLM's (vllm serve --help), e.g. --port, "
            "--block-size, --max-model-len."
        ),
    )
    _add_serve_arguments(serve)
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


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``fastprompt serve``'s own options; without vLLM installed, the command is listed and says what is missing."""
    if importlib.util.find_spec("vllm") is None:
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    from fastprompt.engines.vllm import server

    server.add_arguments(parser)


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace, vllm_argv: list[str]) -> int:
    if importlib.util.find_spec("vllm") is None:
        parser.error("serve needs vLLM, which is not installed here (README, 'Serving with vLLM': .ci/vllm-env)")
    from fastprompt.engines.vllm import server

    try:
        return server.main(args, vllm_argv)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(f"serve: {first_line(exc)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastprompt`` console script and of ``python -m fastprompt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # serve hands every option it does not know to vLLM's own parser
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _run_serve(parser, args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bench":
        return bench.run(parser, args, shlex.join(["fastprompt", *argv]))
    return _run_info()
