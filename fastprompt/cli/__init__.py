"""The ``fastprompt`` command: ``fastprompt bench`` (how much faster, here) and ``fastprompt info``.

Bad options end with one line, ``fastprompt: error: ...``, and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from fastprompt.cli import bench
from fastprompt.errors import first_line
from fastprompt.hf import pretrained

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPE_OPTIONS = ("hidden", "layers", "heads", "kv_heads", "vocab")
_SERVING_OPTIONS = ("serve_batch", "prompt_len", "query_len", "serve_new_tokens", "adapters")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fastprompt: error: {message}\n")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, described as ``what`` in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _row_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in bench.ROWS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(bench.ROWS)}; got {text!r}")
    return names


def _device_defaults(option: str) -> str:
    """' (default: X on CPU, Y on CUDA)' for an option whose default depends on the device."""
    name = option.removeprefix("--").replace("-", "_")
    values = []
    for device, defaults in bench.DEFAULTS.items():
        if name in _SHAPE_OPTIONS:
            value = getattr(defaults["shape"], name)
        elif name in _SERVING_OPTIONS:
            value = getattr(defaults["serving"], name)
        else:
            value = defaults[name]
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        values.append(f"{value} on {device.upper()}")
    return f" (default: {', '.join(values)})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastprompt",
        description="fastprompt: fused kernels for prompt-based tuning on Hugging Face transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,info,serve}")

    b = commands.add_parser(
        "bench",
        help="measure fastprompt against the naive PEFT path on this machine",
        description=(
            "Time one training step (prefix-tuning, P-tuning v2, P-tuning) and greedy generation with a "
            "prefix-tuned adapter, on the naive PEFT path and after fastprompt.patch, in one run. "
            f"The serving rows ({', '.join(bench.SERVING)}) are opt-in through --methods: fastprompt's "
            "adapter_names against the best path without it. "
            "Without options: a small random-weight Llama model on CPU, a 1B-class one (bf16) on CUDA. "
            "Prints a markdown table naming device, versions, commit and this command."
        ),
    )
    b.add_argument(
        "--methods",
        type=_row_list,
        default=bench.DEFAULT_ROWS,
        metavar="LIST",
        help=f"comma-separated rows to measure, from {','.join(bench.ROWS)} "
        f"(default: {','.join(bench.DEFAULT_ROWS)}; the serving rows take minutes on a CPU)",
    )
    b.add_argument(
        "--model",
        metavar="NAME|PATH",
        help=f"a real model by name ({', '.join(pretrained.NAMED_MODELS)}: converted once into "
        f"${pretrained.CACHE_ENV}, default ~/.cache/fastprompt/models) or a local checkpoint directory "
        "(loaded with local_files_only=True), instead of random weights",
    )
    shape = b.add_argument_group("random-weight model shape")
    for option, text in (
        ("--hidden", "hidden size"),
        ("--layers", "number of decoder layers"),
        ("--heads", "attention heads"),
        ("--kv-heads", "key/value heads (GQA)"),
        ("--vocab", "vocabulary size"),
    ):
        shape.add_argument(option, type=_positive_int, help=text + _device_defaults(option))
    work = b.add_argument_group("work per call")
    for option, kind, text in (
        ("--batch", _positive_int, "batch size"),
        ("--seq-len", _positive_int, "tokens per row (training) and prompt length (generate)"),
        ("--prefix-len", _positive_int, "virtual tokens of each adapter"),
        ("--new-tokens", _positive_int, "tokens generated per row in the generate row"),
        ("--iters", _positive_int, "timed calls per measurement (the median is reported)"),
        ("--warmup", _non_negative_int, "untimed calls before timing"),
    ):
        work.add_argument(option, type=kind, help=text + _device_defaults(option))
    serving = b.add_argument_group(f"serving rows ({', '.join(bench.SERVING)})")
    for option, text in (
        ("--serve-batch", "rows of the batch (a multiple of --adapters)"),
        ("--prompt-len", "tokens of the shared prompt (few-shot, shared-generate)"),
        ("--query-len", "tokens of each row after the prompt"),
        ("--serve-new-tokens", "tokens generated per row (shared-generate)"),
        ("--adapters", "different adapters in the batch (mixed-adapters)"),
    ):
        serving.add_argument(option, type=_positive_int, help=text + _device_defaults(option))
    work.add_argument("--dtype", choices=tuple(_DTYPES), help="model dtype" + _device_defaults("--dtype"))
    work.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if present")
    out = b.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="write every figure, with environment, as JSON")
    out.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG chart (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")

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
        help="which attention backends are available here, and why not",
        description="Print versions, the device, and for each backend of the attention op whether it can run.",
    )
    return parser


def _check_output_path(parser: argparse.ArgumentParser, option: str, path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        parser.error(f"{option} {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        parser.error(f"{option} {path}: directory {path.parent} does not exist")
    existed = path.exists()
    try:  # opened now, so that a path that cannot be written fails before the run, not after it
        path.open("a").close()
    except OSError as exc:
        parser.error(f"{option} {path}: cannot write there: {exc.strerror}")
    if not existed:
        path.unlink()


def _check_model_path(parser: argparse.ArgumentParser, path: Path) -> Path:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    if not (path / "config.json").is_file():
        parser.error(f"--model {path}: not a local model directory (no config.json there)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        parser.error(f"--model {path}: no weights there (*.safetensors or *.bin)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"--model {path}: cannot read its config: {first_line(exc)}")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        parser.error(f"--model {path}: a {config.model_type} model has no causal language-model head")
    return path.resolve()


def _resolve_model(parser: argparse.ArgumentParser, name_or_path: str) -> Path:
    try:
        return pretrained.resolve_model(name_or_path)
    except pretrained.MissingPackageError as exc:
        parser.error(f"--model {name_or_path}: {exc}")


def bench_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bench.BenchConfig:
    """The run that ``args`` ask for, with the device's defaults filled in; bad options end in parser.error."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA GPU is available (torch {torch.__version__})")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    defaults = bench.DEFAULTS[device.type]

    given_shape = [f"--{name.replace('_', '-')}" for name in _SHAPE_OPTIONS if getattr(args, name) is not None]
    if args.model is not None:
        if given_shape:
            parser.error(f"{', '.join(given_shape)} cannot be combined with --model (the checkpoint has a shape)")
        model: bench.ModelShape | Path = _check_model_path(parser, _resolve_model(parser, args.model))
    else:
        model = bench.ModelShape(
            **{name: getattr(args, name) or getattr(defaults["shape"], name) for name in _SHAPE_OPTIONS}
        )
        try:
            model.check()
        except ValueError as exc:
            parser.error(f"model shape: {exc}")

    _check_output_path(parser, "--json", args.json)
    _check_output_path(parser, "--plot", args.plot)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib")

    def pick(name: str):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    serving = bench.ServingShape(
        **{name: getattr(args, name) or getattr(defaults["serving"], name) for name in _SERVING_OPTIONS}
    )
    if any(name in bench.SERVING for name in args.methods):
        try:
            serving.check()
        except ValueError as exc:
            parser.error(f"serving rows: {exc}")

    return bench.BenchConfig(
        rows=args.methods,
        model=model,
        batch=pick("batch"),
        seq_len=pick("seq_len"),
        prefix_len=pick("prefix_len"),
        new_tokens=pick("new_tokens"),
        dtype=defaults["dtype"] if args.dtype is None else _DTYPES[args.dtype],
        device=device,
        iters=pick("iters"),
        warmup=pick("warmup"),
        serving=serving,
    )


def _run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    from tqdm import tqdm

    config = bench_config(parser, args)
    bar = tqdm(
        total=bench.steps(config),
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
        bar_format="{desc:<28} {bar} {n_fmt}/{total_fmt} [{elapsed}]",
        leave=False,
    )

    stages_begun = 0

    def progress(stage: str) -> None:
        nonlocal stages_begun
        bar.update(min(stages_begun, 1))
        stages_begun += 1
        bar.set_description_str(stage)

    with bar, warnings.catch_warnings():
        # Deprecation notices that transformers and peft raise at each other are not ours to show.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            result = bench.run(config, progress)
        except bench.CheckpointError as exc:
            parser.error(f"--model: {exc}")
        except bench.OutputMismatchError as exc:
            # Not a usage error: fastprompt and a baseline disagree, and a timing of wrong outputs is no result.
            print(f"fastprompt: bench failed: {exc}", file=sys.stderr)
            return 1
        bar.update(1)

    print(bench.format_markdown(result, command), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(bench.to_json(result, command), indent=2) + "\n")
    if args.plot is not None:
        bench.plot(result, args.plot)
    return 0


def _run_info() -> int:
    from fastprompt.attention import available_backends

    env = bench.environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
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
        return _run_bench(parser, args, shlex.join(["fastprompt", *argv]))
    return _run_info()
