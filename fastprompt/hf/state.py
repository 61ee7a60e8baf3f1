"""What :func:`fastprompt.patch` leaves on a model: one record, on the instance, that :func:`fastprompt.unpatch`
removes with everything it owns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastprompt.errors import UnsupportedModelError
from fastprompt.hf.registry import AdapterRegistry
from fastprompt.hf.swaps import Swaps

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["PatchState", "adapter_registry", "patch_state"]

# The instance attribute that holds a patched model's PatchState.
_STATE_ATTR = "_fastprompt_patch_state"


@dataclass
class PatchState:
    """A patch: what to restore, and what lives exactly as long as the patch."""

    base: PreTrainedModel
    attn_implementation: str
    # the named prefixes adapter_names can use (and the cached encoder outputs behind them)
    registry: AdapterRegistry
    # the methods replaced on the model (and its base model)
    swaps: Swaps = field(default_factory=Swaps)
    # whether patch() turned on encoder checkpoints (so unpatch() turns them off)
    encoder_checkpoints: bool = False

    def attach(self, model: Any) -> None:
        object.__setattr__(model, _STATE_ATTR, self)

    @staticmethod
    def detach(model: Any) -> PatchState | None:
        return model.__dict__.pop(_STATE_ATTR, None)


def patch_state(model: Any) -> PatchState | None:
    """The patch state of ``model``, or ``None`` if it is not patched."""
    return model.__dict__.get(_STATE_ATTR)


def adapter_registry(model: Any) -> AdapterRegistry:
    """The registry of a model patched by :func:`fastprompt.patch`; it lives as long as the patch."""
    state = patch_state(model)
    if state is None:
        raise UnsupportedModelError(
            f"this {type(model).__name__} is not patched: call fastprompt.patch(model) first (its named prefixes "
            "live on the patch, and only a patched model can serve them)"
        )
    return state.registry
