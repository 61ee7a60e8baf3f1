"""The ``fastprompt`` command: bench end to end on a tiny model, its JSON and PNG, info, bad options.

Figures are checked for consistency with each other and with the options, never against speed targets
(those belong to ``benchmarks/``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastprompt import bench, cli
from fastprompt.bench import attention as bench_attention
from fastprompt.bench.timing import Measurement

TINY = {
    "--hidden": 32,
    "--layers": 1,
    "--heads": 4,
    "--kv-heads": 2,
    "--vocab": 64,
    "--batch": 2,
    "--seq-len": 12,
    "--prefix-len": 3,
    "--new-tokens": 3,
    "--iters": 1,
    "--warmup": 0,
}
TINY_ARGS = [str(part) for option in TINY.items() for part in option]
TIMEOUT_S = 600  # the first run may compile the C++ kernels
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _python_m(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastprompt", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _attention_cases() -> list[tuple[bench_attention.Case, str]]:
    """The attention rows a default run measures: (case, pass)."""
    return [(case, mode) for case in bench_attention.bench_cases()
            for mode in (bench_attention.MODES if case.trains else bench_attention.MODES[:1])]


def _attention_labels() -> list[str]:
    return [f"{case.label}, {mode}" for case, mode in _attention_cases()]


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """Data rows of the results table, keyed by their first cell."""
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("case", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix("x"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``python -m fastprompt bench`` run on a tiny model, with --json and --plot."""
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", *TINY_ARGS, "--json", out / "result.json"]
    if HAVE_MATPLOTLIB:
        args += ["--plot", out / "result.png"]
    proc = _python_m(*args)
    assert proc.returncode == 0, proc.stderr
    return proc, out, "fastprompt " + " ".join(map(str, args))


def test_bench_prints_the_table(tiny_run):
    proc, out, command = tiny_run
    assert "Traceback" not in proc.stderr
    assert f"- command: `{command}`" in proc.stdout
    assert torch.__version__ in proc.stdout
    assert f"peft {importlib.metadata.version('peft')}" in proc.stdout
    rows = _table_rows(proc.stdout)
    assert list(rows) == [
        "prefix-tuning (train step)",
        "p-tuning-v2 (train step)",
        "p-tuning (train step)",
        f"generate, prefix-tuning ({TINY['--new-tokens']} new tokens)",
        *_attention_labels(),
    ]
    # The tables print the figures of the JSON of the same run (whose consistency the JSON test checks),
    # each rounded as printed: a ratio of rounded tokens/s says nothing at the tiny model's rates.
    computed = json.loads((out / "result.json").read_text())["rows"]
    assert len(computed) == len(rows)
    for row in computed[-len(_attention_labels()):]:
        fast, naive, bare = row["fastprompt"], row["naive"], row["no_prefix"]
        assert rows[row["name"]] == [
            f"{fast['ms']:.2f}", f"{naive['ms']:.2f}", f"{bare['ms']:.2f}", f"{naive['ms'] / fast['ms']:.2f}x",
            f"{bare['ms'] / fast['ms']:.2f}x", f"{fast['peak_mib']:,.1f}", f"{naive['peak_mib']:,.1f}",
        ], row["name"]
    computed = computed[: -len(_attention_labels())]
    for (label, cells), row in zip(list(rows.items())[: len(computed)], computed, strict=True):
        naive, fast = row["naive"], row["fastprompt"]
        memory = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}x"
        assert cells == [
            f"{naive['tokens_per_s']:,.0f}", f"{fast['tokens_per_s']:,.0f}", f"{row['speedup']:.2f}x",
            f"{naive['peak_mib']:,.1f}", f"{fast['peak_mib']:,.1f}", memory,
        ], label
        assert naive["tokens_per_s"] > 0 and fast["tokens_per_s"] > 0, label


def test_bench_json_has_every_figure(tiny_run):
    proc, out, command = tiny_run
    data = json.loads((out / "result.json").read_text())
    assert data["command"] == command
    assert data["device_type"] == "cpu"
    assert data["versions"]["torch"] == importlib.metadata.version("torch")
    assert data["versions"]["transformers"] == importlib.metadata.version("transformers")
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", data["commit"])
    assert data["config"]["model"] == {
        "hidden": TINY["--hidden"],
        "layers": TINY["--layers"],
        "heads": TINY["--heads"],
        "kv_heads": TINY["--kv-heads"],
        "vocab": TINY["--vocab"],
    }
    assert data["config"]["dtype"] == "float32"
    names = [row["name"] for row in data["rows"]]
    assert names == [*(name for name in bench.DEFAULT_ROWS if name != bench.ATTENTION), *_attention_labels()]
    queries = {f"{case.label}, {mode}": case.B * case.T for case, mode in _attention_cases()}
    for row in data["rows"]:
        assert row["error"] is None, row["error"]
        expected_tokens = TINY["--batch"] * (TINY["--new-tokens"] if row["kind"] == "generate" else TINY["--seq-len"])
        if row["kind"] == bench.ATTENTION:
            expected_tokens = queries[row["name"]]
            assert row["no_prefix"]["ms"] > 0
        else:
            assert row["no_prefix"] is None
        assert row["tokens_per_call"] == expected_tokens
        naive, fast = row["naive"], row["fastprompt"]
        for figures in (naive, fast):
            assert figures["ms"] > 0 and figures["peak_mib"] >= 0
            assert figures["tokens_per_s"] == pytest.approx(expected_tokens / figures["ms"] * 1e3)
        assert row["speedup"] == pytest.approx(naive["ms"] / fast["ms"])
        if naive["peak_mib"] > 0:
            assert row["memory_ratio"] == pytest.approx(fast["peak_mib"] / naive["peak_mib"])
        printed = f"{naive['ms']:.2f}" if row["kind"] == bench.ATTENTION else f"{naive['tokens_per_s']:,.0f}"
        assert printed in proc.stdout


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="--plot needs the optional 'plot' extra (matplotlib)")
def test_bench_plot_is_a_png(tiny_run):
    import matplotlib.image

    path = tiny_run[1] / "result.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    assert pixels.std() > 0.05, "the chart is blank"


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the progress bar shows."""

    def isatty(self) -> bool:
        return True


def _terminal_stderr(monkeypatch) -> _Terminal:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    return terminal


def test_bench_local_checkpoint_with_progress_bar(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    terminal = _terminal_stderr(monkeypatch)
    args = [
        "bench",
        "--model",
        str(tmp_path),
        "--methods",
        "p-tuning-v2,generate",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--prefix-len",
        "2",
        "--new-tokens",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    assert f"local checkpoint {tmp_path.resolve()}" in stdout
    assert list(_table_rows(stdout)) == ["p-tuning-v2 (train step)", "generate, prefix-tuning (2 new tokens)"]
    assert "p-tuning-v2: naive and fastprompt, alternating" in terminal.getvalue()
    assert "generate: naive" in terminal.getvalue()


def test_bench_quiet_writes_nothing_to_stderr(monkeypatch, capsys):
    terminal = _terminal_stderr(monkeypatch)
    assert cli.main(["bench", *TINY_ARGS, "--methods", "p-tuning", "--quiet"]) == 0
    assert list(_table_rows(capsys.readouterr().out)) == ["p-tuning (train step)"]
    assert terminal.getvalue() == ""


def test_refused_case_is_reported_not_hidden():
    config = bench.BenchConfig(
        rows=("prefix-tuning",),
        model=bench.ModelShape(32, 1, 4, 2, 64),
        batch=2,
        seq_len=8,
        prefix_len=2,
        new_tokens=2,
        dtype=torch.float32,
        device=torch.device("cpu"),
        iters=1,
        warmup=0,
    )
    row = bench.Row(
        name="prefix-tuning",
        kind="train",
        tokens=16,
        naive=Measurement(ms=4.0, peak_mib=2.0),
        error="UnsupportedModelError: no attention interface",
    )
    result = bench.BenchResult(config=config, environment=bench.environment(config.device), rows=[row])
    markdown = bench.format_markdown(result, "fastprompt bench")
    assert _table_rows(markdown)["prefix-tuning (train step)"] == ["4,000", "n/a", "n/a", "2.0", "n/a", "n/a"]
    assert "- prefix-tuning: fastprompt refused: UnsupportedModelError: no attention interface" in markdown
    data = bench.to_json(result, "fastprompt bench")["rows"][0]
    assert data["fastprompt"] is None and data["speedup"] is None and data["error"] == row.error


def test_random_batch_is_random_and_left_padded():
    batch = bench.random_batch(100, 8, 40, device="cpu", seed=3)
    mask = batch["attention_mask"]
    assert mask[0].all(), "the first row is full length"
    assert (mask == 0).any(), "some rows are padded"
    # Left padding: once a row starts, it does not stop.
    assert (mask.diff(dim=1) >= 0).all()
    real = batch["input_ids"][mask.bool()]
    assert real.min() >= 1 and real.max() < 100 and real.unique().numel() > 50
    assert (batch["labels"][~mask.bool()] == -100).all()
    assert torch.equal(batch["labels"][mask.bool()], real)
    assert not torch.equal(batch["input_ids"], bench.random_batch(100, 8, 40, device="cpu", seed=4)["input_ids"])


def test_info_lists_every_backend_with_its_reason():
    from fastprompt.attention import available_backends
    from fastprompt.encoders import available_encoder_backends

    # the console script of this environment (beside its python), not whichever is first on PATH
    fastprompt_exe = shutil.which("fastprompt", path=str(Path(sys.executable).parent))
    assert fastprompt_exe is not None, f"no fastprompt console script beside {sys.executable} (pip install -e .)"
    proc = subprocess.run([fastprompt_exe, "info"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout
    for device in ("cuda", "cpu"):
        for what, available in (("attention", available_backends), ("prompt encoder", available_encoder_backends)):
            section = proc.stdout.split(f"\n{what} backends for {device} tensors:\n", 1)[1].split("\n\n")[0]
            for name, (ok, reason) in available(device).items():
                assert re.search(rf"^  {name} +{'yes' if ok else 'no'} +{re.escape(reason)}$", section, re.M), section
    assert re.search(r"^  cpu +yes +alias of torch: there are no C\+\+ encoder kernels", proc.stdout, re.M)
    if available_backends("cpu")["cpu"][0]:  # which build of the C++ kernels runs
        assert re.search(r"^  cpu +yes +C\+\+ kernels: (prebuilt library|ninja build in) ", proc.stdout, re.M)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="without CUDA the cuda section reads 'no CUDA GPU'")
def test_info_on_cuda_names_the_gpu():
    proc = _python_m("info")
    assert torch.cuda.get_device_name() in proc.stdout


def test_no_command_is_a_usage_error():
    proc = _python_m()
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fastprompt: error:") and "Traceback" not in proc.stderr


BAD_OPTIONS = [
    (["frobnicate"], "invalid choice"),
    (["bench", "--batch", "0"], "--batch: expected a positive integer, got '0'"),
    (["bench", "--seq-len", "ten"], "--seq-len: expected a positive integer, got 'ten'"),
    (["bench", "--iters", "-3"], "--iters: expected a positive integer"),
    (["bench", "--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (["bench", "--methods", "lora"], "--methods: expected a comma-separated list of prefix-tuning"),
    (["bench", "--methods", ","], "--methods: expected a comma-separated list"),
    (["bench", "--dtype", "float64"], "--dtype: invalid choice: 'float64'"),
    (["bench", "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["bench", "--hidden", "30", "--heads", "4"], r"hidden \(30\) must be divisible by heads \(4\)"),
    (["bench", "--heads", "8", "--kv-heads", "3"], r"heads \(8\) must be divisible by kv_heads \(3\)"),
    (["bench", "--hidden", "24", "--heads", "8"], "hidden / heads = 3 must be even"),
    (["bench", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["bench", "--json", "/no/such/dir/out.json"], "--json /no/such/dir/out.json: directory /no/such/dir does not"),
    (["bench", "--plot", "/no/such/dir/out.png"], "--plot /no/such/dir/out.png: directory /no/such/dir does not"),
    (["bench", "--json", "/"], "--json /: is a directory"),
    (["bench", "--json", "/proc/out.json"], "--json /proc/out.json: cannot write there"),
    (["bench", "--vocab", "1"], "vocab must be at least 2"),
    (["bench", "--prompt-len", "0"], "--prompt-len: expected a positive integer, got '0'"),
    (
        ["bench", "--methods", "mixed-adapters", "--serve-batch", "30", "--adapters", "16"],
        r"serving rows: serve_batch \(30\) must be a multiple of adapters \(16\)",
    ),
]


def _assert_one_line_error(capsys, argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fastprompt: error: ")
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize(("argv", "match"), BAD_OPTIONS, ids=[" ".join(argv) for argv, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_exit_2(capsys, argv, match):
    _assert_one_line_error(capsys, argv, match)


def test_bad_model_paths(tmp_path, capsys):
    missing = tmp_path / "missing"
    _assert_one_line_error(capsys, ["bench", "--model", str(missing)], "not a local model directory")
    (tmp_path / "config.json").write_text("{")
    _assert_one_line_error(capsys, ["bench", "--model", str(tmp_path)], "no weights there")
    (tmp_path / "model.safetensors").write_bytes(b"")
    _assert_one_line_error(capsys, ["bench", "--model", str(tmp_path)], "cannot read its config")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    _assert_one_line_error(capsys, ["bench", "--model", str(tmp_path)], "t5 model has no causal language-model")
    _assert_one_line_error(
        capsys, ["bench", "--model", str(tmp_path), "--hidden", "64"], "--hidden cannot be combined with --model"
    )


def test_model_whose_weights_cannot_be_loaded(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    ).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    argv = ["bench", "--model", str(tmp_path), "--methods", "p-tuning-v2", "--iters", "1", "--warmup", "0", "--quiet"]
    _assert_one_line_error(capsys, argv, f"--model: cannot load {tmp_path}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(capsys):
    _assert_one_line_error(capsys, ["bench", "--device", "cuda"], "--device cuda: no CUDA GPU is available")


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like to find_spec
    _assert_one_line_error(
        capsys, ["bench", "--plot", str(tmp_path / "chart.png")], r"--plot needs matplotlib.*pip install matplotlib"
    )


def test_bad_option_in_a_subprocess_has_no_traceback(tmp_path):
    proc = _python_m("bench", "--model", tmp_path / "missing", "--batch", "1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fastprompt: error: --model")


def test_defaults_follow_the_device():
    args = cli.build_parser().parse_args(["bench", "--device", "cpu", "--batch", "3"])
    config = cli.bench.bench_config(cli.build_parser(), args)
    cpu = bench.DEFAULTS["cpu"]
    assert config.model == cpu["shape"] and config.dtype == cpu["dtype"] and config.device.type == "cpu"
    assert config.batch == 3 and config.seq_len == cpu["seq_len"] and config.prefix_len == cpu["prefix_len"]
    assert config.rows == bench.DEFAULT_ROWS and config.serving == cpu["serving"]


SERVING_TINY = [*TINY_ARGS, "--prefix-len", "2", "--serve-batch", "4", "--prompt-len", "9", "--query-len", "5",
                "--serve-new-tokens", "3", "--adapters", "2"]
SERVING_LABELS = [
    "few-shot scoring, cached 9-token prompt, vs prepending it",
    "generate after a shared 9-token prompt, vs its K/V copied per row",
    "generate after a shared 9-token prompt, vs prepending it",
    "2 prefix-tuning adapters in one batch (scoring), vs PEFT, a batch per adapter",
    "2 prefix-tuning adapters in one batch (scoring), vs one adapter on all rows",
]


def test_serving_rows_are_opt_in_and_complete(tmp_path, capsys):
    path = tmp_path / "serving.json"
    argv = ["bench", *SERVING_TINY, "--methods", ",".join(bench.SERVING), "--json", str(path), "--quiet"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    rows = _table_rows(stdout)
    assert list(rows) == SERVING_LABELS
    assert "checked equal" in stdout and "copied-cache: prompt K/V computed once" in stdout
    data = json.loads(path.read_text())
    assert data["config"]["serving"] == {"serve_batch": 4, "prompt_len": 9, "query_len": 5, "serve_new_tokens": 3,
                                         "adapters": 2}
    assert [(row["name"], row["baseline"]) for row in data["rows"]] == [
        ("few-shot", "prepend"),
        ("shared-generate", "copied-cache"),
        ("shared-generate", "prepend"),
        ("mixed-adapters", "peft-per-adapter"),
        ("mixed-adapters", "single-adapter"),
    ]
    tokens = {"few-shot": 4 * 5, "shared-generate": 4 * 3, "mixed-adapters": 4 * 5}
    for row, (label, cells) in zip(data["rows"], rows.items(), strict=True):
        assert row["error"] is None and row["tokens_per_call"] == tokens[row["name"]]
        assert row["speedup"] == pytest.approx(row["naive"]["ms"] / row["fastprompt"]["ms"])
        assert _number(cells[2]) == pytest.approx(row["speedup"], rel=0.05, abs=0.01), label
    # one fastprompt measurement per case, shared by the rows of its baselines
    assert data["rows"][1]["fastprompt"] == data["rows"][2]["fastprompt"]
    assert data["rows"][3]["fastprompt"] == data["rows"][4]["fastprompt"]


def test_prepended_batch_is_the_prompt_then_each_row_left_padded():
    batch = bench.random_batch(50, 5, 7, device="cpu", seed=1)
    prompt = torch.randint(1, 50, (1, 4))
    joined = bench.suite._prepended(prompt, batch)
    for row in range(5):
        real = batch["attention_mask"][row].bool()
        pad = int((~real).sum())
        assert torch.equal(joined["attention_mask"][row], torch.tensor([0] * pad + [1] * (11 - pad)))
        assert torch.equal(joined["input_ids"][row, pad:], torch.cat([prompt[0], batch["input_ids"][row][real]]))
        assert joined["position_ids"][row, pad:].tolist() == list(range(11 - pad))


def _cache_another_prompt(monkeypatch):
    """fastprompt serving K/V other than the prompt's (its values scaled, so that even a tiny random model's
    greedy tokens change): its outputs must be refused."""
    import fastprompt
    from fastprompt.hf.state import adapter_registry

    real = fastprompt.cache_prompt

    def wrong(model, name, input_ids):
        real(model, "right", input_ids)
        kv = adapter_registry(model).kv("right").clone()
        kv[:, 1] *= 100
        adapter_registry(model).add_kv(name, kv, "cached_prompt")

    monkeypatch.setattr(fastprompt, "cache_prompt", wrong)


def test_wrong_logits_are_refused_not_timed(monkeypatch, capsys):
    _cache_another_prompt(monkeypatch)
    timed = []
    monkeypatch.setattr(bench.suite, "best_of_rounds", lambda *args, **kwargs: timed.append(1))
    assert cli.main(["bench", *SERVING_TINY, "--methods", "few-shot", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not timed
    assert re.fullmatch(
        r"fastprompt: bench failed: few-shot vs prepending: logits differ by \S+ \(allowed \S+\); not timed\n",
        captured.err,
    )


def test_wrong_tokens_are_refused_not_timed(monkeypatch):
    _cache_another_prompt(monkeypatch)
    args = cli.build_parser().parse_args(["bench", *SERVING_TINY, "--methods", "shared-generate", "--device", "cpu"])
    with pytest.raises(bench.OutputMismatchError, match=r"shared-generate vs copied cache: generated tokens differ"):
        bench.run(cli.bench.bench_config(cli.build_parser(), args))


def test_generate_baseline_that_drops_the_prefix_is_refused_not_timed(monkeypatch, capsys):
    # PEFT 0.21's own generate on transformers 5.24 silently generates without the prefix; a baseline doing the
    # same must not be timed.
    monkeypatch.setattr(bench.suite, "peft_prefix_generate", lambda model, batch, new_tokens: bench.generate_step(
        model.get_base_model(), batch, new_tokens))
    timed = []
    monkeypatch.setattr(bench.suite, "best_of_rounds", lambda *args, **kwargs: timed.append(1))
    # 8 new tokens on 2 rows: the chance that a random prefix changes none of them is negligible
    assert cli.main(["bench", *TINY_ARGS, "--new-tokens", "8", "--methods", "generate", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not timed
    assert re.fullmatch(
        r"fastprompt: bench failed: generate vs PEFT's prefix in the cache: generated tokens differ in rows "
        r"\[[0-9, ]+\]; not timed\n",
        captured.err,
    )


def test_commit_is_the_checkout_s_own():
    root = Path(bench.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("fastprompt is not running from a git checkout here")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert bench.git_commit().removesuffix("-dirty") == head
