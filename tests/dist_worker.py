"""Three optimizer steps of every prompt method under DDP, FSDP2 and FSDP1, in each of 2+ processes.

Launched by tests/test_distributed.py, once per launcher, with every case inside one launch (a launch
costs more than a case)::

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT.pt ddp,fsdp2,fsdp1
    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py OUT.pt ddp,fsdp2 --accelerator

(``--multi_gpu`` is what starts several processes; on a machine without GPUs they run on the CPU.)

Each process takes its contiguous share of the rows of the same global batches that
:func:`train_single` trains on in one process; rank 0 writes every case's trained parameters (full
tensors, by name) to ``OUT.pt`` and its adapter, in PEFT's format, to a folder named after the case next
to it. With ``--accelerator`` DDP goes through ``Accelerator.prepare`` and
``Accelerator.backward``; the FSDP cases shard with :func:`fastprompt.hf.distributed.shard_prompt_model`
under either launcher.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import random_batch, tiny_peft_model  # noqa: E402

import fastprompt  # noqa: E402

METHODS = ("prefix_projection", "prefix", "p_tuning_mlp", "p_tuning_lstm")
STEPS, GLOBAL_BATCH, LENGTH, LR = 3, 4, 12, 0.5


def build(method: str, checkpointing: bool) -> Any:
    """The patched tiny Llama (GQA) with a fresh ``method`` adapter: the same weights in every process."""
    model = tiny_peft_model("llama", method, gqa=True)
    fastprompt.patch(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def batches() -> list[dict[str, torch.Tensor]]:
    """The global batches, one per step: no padding, so every row has as many loss tokens and the mean of
    the per-process mean losses is the global batch's mean loss."""
    return [random_batch(GLOBAL_BATCH, LENGTH, seed=100 + step) for step in range(STEPS)]


def trainable(model: Any) -> dict[str, torch.Tensor]:
    """Trainable parameters of a PEFT model (or of the model a wrapper holds) as full tensors, by name."""
    params = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            params[name] = full.detach().clone()
    return params


def _train(forward_backward: Callable[[dict[str, torch.Tensor]], None], optimizer: torch.optim.Optimizer,
           rows: slice) -> None:
    for batch in batches():
        forward_backward({key: value[rows] for key, value in batch.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _optimizer(params: Any) -> torch.optim.Optimizer:
    # Plain SGD with momentum keeps a rounding difference in a gradient a difference of the same size in
    # the parameters (Adam divides by the gradient's own size, so a near-zero entry could move by lr).
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=LR, momentum=0.9)


def train_single(method: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference: the same steps on the whole global batch in this process. Returns the trainable
    parameters and what PEFT saves of the adapter (its encoder's output, [P, out_dim])."""
    model = build(method, checkpointing)
    optimizer = _optimizer(model.parameters())
    _train(lambda batch: model(**batch).loss.backward(), optimizer, slice(None))
    return trainable(model), model.get_prompt_embedding_to_save("default")


def train_distributed(method: str, checkpointing: bool, wrapper: str, accelerator: Any,
                      save_directory: str) -> dict[str, torch.Tensor]:
    """Trains on this process's rows, saves the adapter (:func:`fastprompt.save_sharded_adapter`) and returns
    the trainable parameters, gathered whole."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    from fastprompt.hf.distributed import save_sharded_adapter, shard_prompt_model

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    model = build(method, checkpointing)
    if wrapper == "ddp" and accelerator is not None:
        wrapped, optimizer = accelerator.prepare(model, _optimizer(model.parameters()))
        _train(lambda batch: accelerator.backward(wrapped(**batch).loss), optimizer, rows)
        save_sharded_adapter(wrapped, save_directory)
        return trainable(accelerator.unwrap_model(wrapped))
    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        wrapped = shard_prompt_model(model, fsdp_version=int(wrapper[-1]))
    optimizer = _optimizer(wrapped.parameters())
    _train(lambda batch: wrapped(**batch).loss.backward(), optimizer, rows)
    save_sharded_adapter(wrapped, save_directory)
    if isinstance(wrapped, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(wrapped):
            return {name.replace("_fsdp_wrapped_module.", ""): p for name, p in trainable(wrapped).items()}
    return trainable(model)


def case_name(method: str, checkpointing: bool, wrapper: str) -> str:
    return f"{method}-{wrapper}-{'checkpointing' if checkpointing else 'plain'}"


def main(out: str, wrappers: list[str], use_accelerator: bool) -> None:
    accelerator = None
    if use_accelerator:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    results = {}
    for method in METHODS:
        for wrapper in wrappers:
            for checkpointing in (False, True):
                case = case_name(method, checkpointing, wrapper)
                results[case] = train_distributed(
                    method, checkpointing, wrapper, accelerator, str(Path(out).parent / case)
                )
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "accelerate": accelerator is not None, "params": results},
                   out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), "--accelerator" in sys.argv[3:])
