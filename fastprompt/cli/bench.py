"""``fastprompt bench``: its options, the run they ask for, and the printed report.

The benchmark itself is the library :mod:`fastprompt.bench`; this module parses, runs and prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from fastprompt.bench import pretrained, suite
from fastprompt.bench.models import CheckpointError, ModelShape
from fastprompt.bench.report import format_markdown, plot, to_json
from fastprompt.bench.suite import (
    DEFAULT_ROWS,
    DEFAULTS,
    ROWS,
    SERVING,
    BenchConfig,
    OutputMismatchError,
    ServingShape,
    steps,
)
from fastprompt.errors import first_line

__all__ = ["add_parser", "bench_config", "run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPE_OPTIONS = ("hidden", "layers", "heads", "kv_heads", "vocab")
_SERVING_OPTIONS = ("serve_batch", "prompt_len", "query_len", "serve_new_tokens", "adapters")


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
    unknown = [name for name in names if name not in ROWS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(ROWS)}; got {text!r}")
    return names


def _device_defaults(option: str) -> str:
    """' (default: X on CPU, Y on CUDA)' for an option whose default depends on the device."""
    name = option.removeprefix("--").replace("-", "_")
    values = []
    for device, defaults in DEFAULTS.items():
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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``bench`` command and its options, added to the ``fastprompt`` parser's ``commands``."""
    b = commands.add_parser(
        "bench",
        help="measure fastprompt against the naive PEFT path on this machine",
        description=(
            "Time one training step (prefix-tuning, P-tuning v2, P-tuning) and greedy generation with a "
            "prefix-tuned adapter, on the naive PEFT path and after fastprompt.patch, in one run, and the "
            "attention op alone on real models' head geometries against the naive path and SDPA without "
            "the prefix. "
            f"The serving rows ({', '.join(SERVING)}) are opt-in through --methods: fastprompt's "
            "adapter_names against the best path without it. "
            "Without options: a small random-weight Llama model on CPU, a 1B-class one (bf16) on CUDA. "
            "Prints a markdown table naming device, versions, commit and this command."
        ),
    )
    b.add_argument(
        "--methods",
        type=_row_list,
        default=DEFAULT_ROWS,
        metavar="LIST",
        help=f"comma-separated rows to measure, from {','.join(ROWS)} "
        f"(default: {','.join(DEFAULT_ROWS)}; the serving rows take minutes on a CPU)",
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
    serving = b.add_argument_group(f"serving rows ({', '.join(SERVING)})")
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


def bench_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchConfig:
    """The run that ``args`` ask for, with the device's defaults filled in; bad options end in parser.error."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA GPU is available (torch {torch.__version__})")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    defaults = DEFAULTS[device.type]

    given_shape = [f"--{name.replace('_', '-')}" for name in _SHAPE_OPTIONS if getattr(args, name) is not None]
    if args.model is not None:
        if given_shape:
            parser.error(f"{', '.join(given_shape)} cannot be combined with --model (the checkpoint has a shape)")
        model: ModelShape | Path = _check_model_path(parser, _resolve_model(parser, args.model))
    else:
        model = ModelShape(
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

    serving = ServingShape(
        **{name: getattr(args, name) or getattr(defaults["serving"], name) for name in _SERVING_OPTIONS}
    )
    if any(name in SERVING for name in args.methods):
        try:
            serving.check()
        except ValueError as exc:
            parser.error(f"serving rows: {exc}")

    return BenchConfig(
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


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    """``fastprompt bench``: the run ``args`` ask for, its table on stdout, JSON and chart where asked.

    Exit status 0, or 1 when fastprompt and a baseline disagree (no timing of wrong outputs is printed).
    """
    from tqdm import tqdm

    config = bench_config(parser, args)
    bar = tqdm(
        total=steps(config),
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
            result = suite.run(config, progress)
        except CheckpointError as exc:
            parser.error(f"--model: {exc}")
        except OutputMismatchError as exc:
            # Not a usage error: fastprompt and a baseline disagree, and a timing of wrong outputs is no result.
            print(f"fastprompt: bench failed: {exc}", file=sys.stderr)
            return 1
        bar.update(1)

    print(format_markdown(result, command), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(result, command), indent=2) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    return 0


