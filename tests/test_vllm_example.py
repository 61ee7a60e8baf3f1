"""examples/vllm_adapters.py, the example the README's "Serving with vLLM" points to, runs as written (vLLM's
default multi-process engine) and its answers equal fastprompt's ``generate`` (it asserts so itself)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; build its environment with .ci/vllm-env DIR and "
                    "run DIR/bin/pytest -m vllm")

pytestmark = pytest.mark.vllm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vllm_adapters.py"


def test_the_example_runs_and_equals_fastprompt_generate(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = [m[1] for m in re.finditer(r"^\s*(\S+): \[[\d, ]+\]$", done.stdout, re.MULTILINE)]
    assert printed == ["summarize", "translate", "few-shot", "__base__"]
