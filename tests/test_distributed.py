"""Prompt methods train under DDP, FSDP2 and FSDP1 with 2 CPU processes (gloo), launched with ``torchrun``
(DDP, FSDP2, FSDP1) and with ``accelerate launch`` (DDP through ``Accelerator``, FSDP2): after 3 optimizer
steps every trainable parameter equals single-process training on the same global batch, with gradient
checkpointing off and on, and the adapter that :func:`fastprompt.save_sharded_adapter` saves in PEFT's
format holds what the single process saves.

One launch per launcher runs every case (tests/dist_worker.py); the single-process references are trained
here, in this process, by the same code. Compared are the parameter *updates* (trained minus initial),
each to ``UPDATE_TOL`` of its own largest entry: the processes differ from one process only in float32
summation order (two half-batch gradient sums averaged instead of one full-batch sum, about 1e-7
relative per gradient, grown by the LSTM's recurrence over 3 momentum steps to at most 6e-5 measured),
while a wrong reduction (sum instead of mean, a gradient not all-reduced, a shard not gathered) is off
by the size of the update itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dist_worker
import pytest
import torch
from models import assert_scaled_close
from safetensors.torch import load_file

UPDATE_TOL = 1e-3
WORLD = 2
TIMEOUT_S = 600
# Under accelerate, DDP goes through Accelerator.prepare; the FSDP cases are fastprompt's own sharding,
# the same code under either launcher, so FSDP1 runs once (under torchrun).
WRAPPERS = {"torchrun": ("ddp", "fsdp2", "fsdp1"), "accelerate": ("ddp", "fsdp2")}
# What is checked here is how gradients are reduced, not the attention kernels (tested against float64
# elsewhere): the PyTorch backend spares every process the load of the C++ extension.
BACKEND = "torch"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_command(launcher: str, out: Path) -> list[str]:
    worker = [str(Path(dist_worker.__file__)), str(out), ",".join(WRAPPERS[launcher])]
    port = str(_free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                "--master-addr", "127.0.0.1", "--master-port", port, *worker]
    # --multi_gpu is accelerate's multi-process launcher; without a GPU its processes run on the CPU
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
            *worker, "--accelerator"]


@dataclass(frozen=True)
class Reference:
    """One process's run of a case: parameters before and after, and PEFT's saved tensor before and after."""

    initial: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor]
    initial_saved: torch.Tensor
    trained_saved: torch.Tensor


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, bool], Reference]:
    refs = {}
    with pytest.MonkeyPatch.context() as patch_env:
        patch_env.setenv("FASTPROMPT_BACKEND", BACKEND)
        for method in dist_worker.METHODS:
            for checkpointing in (False, True):
                model = dist_worker.build(method, checkpointing)
                initial = dist_worker.trainable(model), model.get_prompt_embedding_to_save("default")
                trained, trained_saved = dist_worker.train_single(method, checkpointing)
                refs[(method, checkpointing)] = Reference(initial[0], trained, initial[1], trained_saved)
    return refs


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_distributed_training_matches_one_process(launcher, references, tmp_path):
    out = tmp_path / "params.pt"
    # two processes on a shared CPU: one thread each, no oversubscription
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTPROMPT_BACKEND": BACKEND}
    start = time.perf_counter()
    proc = subprocess.run(_launch_command(launcher, out), capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{launcher} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    print(f"{launcher}: {time.perf_counter() - start:.0f} s")
    result = torch.load(out)
    assert result["world_size"] == WORLD
    assert result["accelerate"] == (launcher == "accelerate")
    expected_cases = {
        dist_worker.case_name(method, checkpointing, wrapper)
        for method in dist_worker.METHODS
        for wrapper in WRAPPERS[launcher]
        for checkpointing in (False, True)
    }
    assert set(result["params"]) == expected_cases
    failures = []
    for method in dist_worker.METHODS:
        for checkpointing in (False, True):
            ref = references[(method, checkpointing)]
            for wrapper in WRAPPERS[launcher]:
                case = dist_worker.case_name(method, checkpointing, wrapper)
                params = result["params"][case]
                if set(params) != set(ref.trained):
                    failures.append(f"{case}: parameters {sorted(set(params) ^ set(ref.trained))} differ in name")
                    continue
                try:
                    for name, value in params.items():
                        assert_scaled_close(value - ref.initial[name], ref.trained[name] - ref.initial[name],
                                            UPDATE_TOL, f"{case} {name} update")
                    # PEFT saves the encoder's output: its change over training is held like an update
                    saved = load_file(tmp_path / case / "adapter_model.safetensors")["prompt_embeddings"]
                    assert_scaled_close(saved - ref.initial_saved, ref.trained_saved - ref.initial_saved, UPDATE_TOL,
                                        f"{case} saved adapter")
                except AssertionError as err:
                    failures.append(str(err))
    assert not failures, "\n".join(failures)
