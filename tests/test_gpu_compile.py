"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) within their shared memory.

The interpreter, which runs the kernels in the other tests on CPU, never compiles them; this test does,
without a GPU, through ``tests/gpu_compile.py`` (see there). It runs in a subprocess because the compile
needs ``TRITON_INTERPRET`` unset, and conftest sets it for this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu(arch: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is what the kernels run with
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch), "--quick"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in proc.stdout.splitlines()
            if line.startswith(("| attention", "| encoder"))}
    kernels = {kernel for _, kernel in rows}
    # every kernel the package launches was compiled (a launcher that stopped launching would pass silently)
    assert kernels >= {"_fwd_kernel", "_decode_kernel", "_merge_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel",
                       "_bwd_dkdv_kernel", "_bwd_dprefix_kernel", "_grouped_prefix_kernel",
                       "_linear_kernel"}, proc.stdout
    # both LSTM launch modes: one launch for all steps (H = 64) and one launch per step (H = 2048)
    for H in (64, 2048):
        for kernel in ("_lstm_fwd_kernel", "_lstm_bwd_kernel"):
            assert (f"encoder LSTM H={H} float32", kernel) in rows, proc.stdout
