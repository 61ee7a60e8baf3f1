"""Sharding a patched PEFT prompt-learning model with FSDP.

A patched model runs its prompt encoder as a function of the encoder's parameters
(:func:`fastprompt.encode_prompt`), not by calling the encoder module, so the forward hooks through which
FSDP gathers a unit's parameters never fire for the encoder. The encoder therefore has to stay in the
unit of the model's root, whose parameters are gathered for the whole forward; a unit of its own (what
PEFT's ``fsdp_auto_wrap_policy`` and accelerate's policies make of it) would leave them sharded. The
encoder is small (a few virtual tokens), so keeping it whole costs nothing worth saving.
:func:`shard_prompt_model` shards every transformer block as its own unit and the rest, prompt encoders
included, as the root unit. :func:`save_sharded_adapter` saves the adapter of a sharded model in PEFT's
format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["save_sharded_adapter", "shard_prompt_model", "transformer_blocks"]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` whose classes its ``transformers`` model names in ``_no_split_modules``
    (the decoder or encoder layers), outermost first."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [module for module in base.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(base).__name__} names no transformer block classes in _no_split_modules ({sorted(names)}), "
            "so there is nothing to shard as a unit"
        )
    return blocks


def shard_prompt_model(model: torch.nn.Module, *, fsdp_version: int = 2, **fsdp_kwargs: Any) -> torch.nn.Module:
    """Shard ``model`` (a patched ``peft.PeftModel`` or a plain ``transformers`` model) with FSDP.

    Every transformer block (:func:`transformer_blocks`) becomes a unit; the root unit holds the rest:
    embeddings, head and the prompt encoders, which must not be units of their own (module docstring).
    Call it after :func:`fastprompt.patch` and after ``gradient_checkpointing_enable`` (non-reentrant),
    in a process group that is already initialised.

    Args:
        model: the model to shard; FSDP2 shards it in place.
        fsdp_version: 2 for ``torch.distributed.fsdp.fully_shard`` (returns ``model`` itself), 1 for the
            ``FullyShardedDataParallel`` wrapper (returns the wrapper; ``use_orig_params=True`` so that the
            encoder's parameters keep their names and can be read during the forward; on a machine without an
            accelerator ``device_id`` defaults to the CPU).
        fsdp_kwargs: passed to ``fully_shard`` (e.g. ``mesh``, ``mp_policy``) or ``FullyShardedDataParallel``.

    Returns:
        The model to train: call it and pass its ``parameters()`` to the optimizer.
    """
    blocks = transformer_blocks(model)
    if fsdp_version == 2:
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block, **fsdp_kwargs)
        fully_shard(model, **fsdp_kwargs)
        return model
    if fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        fsdp_kwargs.setdefault("use_orig_params", True)
        if not fsdp_kwargs["use_orig_params"]:
            raise ValueError(
                "FSDP1 needs use_orig_params=True here: with flat parameters the prompt encoder's parameters are "
                "views that the patched forward cannot read"
            )
        if not torch.accelerator.is_available():
            # FSDP1 looks for an accelerator unless told the device; CPU training (gloo) has to say so.
            fsdp_kwargs.setdefault("device_id", torch.device("cpu"))
        policy = ModuleWrapPolicy({type(block) for block in blocks})
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, **fsdp_kwargs)
    raise ValueError(f"fsdp_version must be 1 or 2, got {fsdp_version!r}")


@contextlib.contextmanager
def _whole_root(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The unwrapped model, with the parameters of the root unit whole for the duration (collective)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        yield model.module
    elif isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield model.module
    elif isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield model
        finally:
            model.reshard()
    else:
        yield model


def save_sharded_adapter(model: torch.nn.Module, save_directory: str, **save_kwargs: Any) -> None:
    """Save the PEFT adapter of ``model`` in PEFT's format, whether it is sharded by :func:`shard_prompt_model`,
    under ``DistributedDataParallel`` or not wrapped.

    Collective: every process calls it and process 0 writes (the only process without a process group).
    PEFT saves a prompt-learning adapter by running its encoder, so the root unit is gathered first; and
    PEFT's ``save_pretrained`` is handed the encoder's parameters as its ``state_dict``, because the
    model's own ``state_dict()`` would run FSDP's hooks (FSDP2 puts the sharded parameters back; FSDP1
    gathers, a collective that process 0 would enter alone).

    Args:
        model: what :func:`shard_prompt_model` returned, a DDP-wrapped or a plain ``peft.PeftModel``.
        save_directory: the folder ``PeftModel.from_pretrained`` will load.
        save_kwargs: further arguments of ``PeftModel.save_pretrained``.
    """
    writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    with _whole_root(model) as peft_model:
        if writer:
            encoders = {name: p.detach() for name, p in peft_model.named_parameters() if "prompt_encoder." in name}
            # PEFT's own method, not the instance's encoder-checkpoint wrapper (fastprompt.patch installs it),
            # which reads the encoder's state_dict(): sharded parameters have no storage to write
            type(peft_model).save_pretrained(peft_model, save_directory, state_dict=encoders, **save_kwargs)
