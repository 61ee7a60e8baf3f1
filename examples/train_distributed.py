"""Prompt learning in several processes: a patched PEFT model trained with DDP, FSDP2 or FSDP1.

    torchrun --standalone --nproc-per-node 2 examples/train_distributed.py --method prefix-tuning --shard fsdp2

Runs on CPUs (gloo) or one GPU per process (nccl). Every process builds the same model (here a small
random-weight Llama so that nothing is downloaded; use ``from_pretrained`` in real work), takes its share
of each global batch, and the wrapper averages the prompt encoder's gradients. Rank 0 prints the loss of
each step and saves the adapter in PEFT's format, which ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import fastprompt
from fastprompt.hf.distributed import save_sharded_adapter, shard_prompt_model

METHODS = {
    "prefix-tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True),
    "p-tuning-v2": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="prefix-tuning")
    parser.add_argument("--shard", choices=("ddp", "fsdp2", "fsdp1"), default="ddp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--output", default="adapter-distributed", help="where rank 0 saves the adapter")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same base model and adapter in every process
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)
    model = get_peft_model(LlamaForCausalLM(config), METHODS[args.method]()).to(device)
    fastprompt.patch(model)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.shard == "ddp":
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    else:
        # transformer blocks as FSDP units, the prompt encoder kept in the root unit
        wrapped = shard_prompt_model(model, fsdp_version=int(args.shard[-1]))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)

    per_rank = args.global_batch // world
    data = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        input_ids = torch.randint(3, 1000, (args.global_batch, 32), generator=data)
        mine = input_ids[rank * per_rank : (rank + 1) * per_rank].to(device)
        loss = wrapped(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)  # a sum: gloo has no average
        if rank == 0:
            print(f"step {step}: loss {total.item() / world:.4f}")

    save_sharded_adapter(wrapped, args.output)  # every rank calls it (gathering is collective), rank 0 writes
    if rank == 0:
        print(f"saved the {args.method} adapter to {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
