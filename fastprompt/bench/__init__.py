"""The benchmark library: cases, the timed work, the run behind ``fastprompt bench`` and its report.

Used by ``fastprompt bench`` (:mod:`fastprompt.cli.bench`), by ``benchmarks/`` and by the tests of both;
it sits above ``serving`` and below ``cli``: nothing in the library's layers imports it.

- :mod:`.models`: random-weight models, PEFT adapters, batches (``build_case``);
- :mod:`.pretrained`: real checkpoints and data shipped by pip packages (SmolLM2, MiniLM, movie reviews);
- :mod:`.work`: the timed work (a training step, greedy generation) and PEFT's path where it needs spelling out;
- :mod:`.timing`: one way to time a call and measure its peak memory, alternating sides over rounds;
- :mod:`.attention`: the attention grid (real models' head geometries) and its three timed calls;
- :mod:`.suite`: the rows of ``fastprompt bench`` and :func:`run`;
- :mod:`.provenance` and :mod:`.report`: a table's header (device, versions, commit) and the report itself.
"""

from fastprompt.bench.models import (
    METHODS,
    PAD_TOKEN_ID,
    CheckpointError,
    ModelShape,
    build_base_model,
    build_case,
    peft_config,
    random_batch,
    wrap,
)
from fastprompt.bench.provenance import device_name, environment, environment_lines, git_commit, versions
from fastprompt.bench.report import format_markdown, plot, to_json
from fastprompt.bench.suite import (
    ATTENTION,
    BASELINES,
    DEFAULT_ROWS,
    DEFAULTS,
    GENERATE,
    ROUNDS,
    ROWS,
    SERVING,
    BenchConfig,
    BenchResult,
    OutputMismatchError,
    Row,
    ServingShape,
    patched,
    run,
    steps,
)
from fastprompt.bench.timing import Measurement
from fastprompt.bench.work import generate_step, make_optimizer, peft_prefix_generate, peft_prefix_inputs, train_step

__all__ = [
    "ATTENTION",
    "BASELINES",
    "DEFAULTS",
    "DEFAULT_ROWS",
    "GENERATE",
    "METHODS",
    "PAD_TOKEN_ID",
    "ROUNDS",
    "ROWS",
    "SERVING",
    "BenchConfig",
    "BenchResult",
    "CheckpointError",
    "Measurement",
    "ModelShape",
    "OutputMismatchError",
    "Row",
    "ServingShape",
    "build_base_model",
    "build_case",
    "device_name",
    "environment",
    "environment_lines",
    "format_markdown",
    "generate_step",
    "git_commit",
    "make_optimizer",
    "patched",
    "peft_config",
    "peft_prefix_generate",
    "peft_prefix_inputs",
    "plot",
    "random_batch",
    "run",
    "steps",
    "to_json",
    "train_step",
    "versions",
    "wrap",
]
