"""The encoder cache: an object its owner keeps (a patched model, a template model), never module state.

One entry per encoder, held under a weak key so that a dropped encoder drops its entry, and dropping the
cache drops them all. An entry holds the encoder's tokens as last given, their copy on the weights' device
(PEFT keeps prompt tokens on the CPU: a steady-state forward neither copies nor waits for the GPU) and the
output last computed without gradients with the :func:`state_key` it was computed under.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

__all__ = ["EncoderCache", "state_key"]


def state_key(encoder: torch.nn.Module, backend: str | None) -> tuple:
    """What an encoder's output depends on besides its tokens: every parameter's identity, storage, version,
    dtype and device, the backend asked for, and whether inference mode is on (its outputs cannot enter
    autograd later).

    An in-place update (optimizer step, ``load_state_dict``, ``copy_`` under no_grad) bumps ``_version``; a
    new tensor put in place changes identity or data_ptr. Writes through ``param.data`` are invisible to both:
    call :meth:`EncoderCache.clear` after those.
    """
    params = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in encoder.parameters())
    return params, backend, torch.is_inference_mode_enabled()


@dataclasses.dataclass
class _Entry:
    tokens: torch.Tensor  # [P] as given (a copy), on the host or the device
    on_device: torch.Tensor  # [P] the same values on the weights' device
    state: tuple | None = None
    output: torch.Tensor | None = None


class EncoderCache:
    """Outputs of prompt encoders and device copies of their tokens, for :func:`fastprompt.encode_prompt`.

    The owner creates one and passes it to every call (``encode_prompt(encoder, tokens, cache=cache)``);
    its entries live as long as both the cache and the encoder do.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[torch.nn.Module, _Entry] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self) -> tuple[type[EncoderCache], tuple[()]]:
        # a copy or a pickle starts empty: the entries belong to this cache's encoders, not to their copies
        return EncoderCache, ()

    def tokens_on(self, encoder: torch.nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tokens`` [P] on ``device``, copied once per token vector; other tokens replace the entry.

        Host tokens are compared on the host, so a forward does not wait for the GPU; device tokens cost a sync.
        """
        entry = self._entries.get(encoder)
        if (entry is not None and entry.on_device.device == device and entry.tokens.device == tokens.device
                and entry.tokens.shape == tokens.shape and torch.equal(entry.tokens, tokens)):
            return entry.on_device
        # outside inference mode: a later training forward saves the copy for backward
        with torch.inference_mode(False):
            kept = tokens.clone()
            entry = _Entry(kept, kept if kept.device == device else kept.to(device))
        self._entries[encoder] = entry
        return entry.on_device

    def output(self, encoder: torch.nn.Module, state: tuple) -> torch.Tensor | None:
        """The output stored for ``encoder`` under ``state`` and its current tokens (see :meth:`tokens_on`)."""
        entry = self._entries.get(encoder)
        return entry.output if entry is not None and entry.state == state else None

    def store(self, encoder: torch.nn.Module, state: tuple, output: torch.Tensor) -> None:
        """Keep ``output`` for ``encoder``'s current tokens under ``state``; call :meth:`tokens_on` first."""
        entry = self._entries[encoder]
        entry.state, entry.output = state, output

    def clear(self, encoder: torch.nn.Module | None = None) -> None:
        """Forget ``encoder``'s entry (every entry if ``None``)."""
        if encoder is None:
            self._entries.clear()
        else:
            self._entries.pop(encoder, None)
