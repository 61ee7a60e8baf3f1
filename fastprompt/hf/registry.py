"""The named prefixes a patched model serves, and the prefix bank of a batch whose rows name them.

An :class:`AdapterRegistry` belongs to one patched model instance: :func:`fastprompt.patch` creates it with the
patch state and :func:`fastprompt.unpatch` drops it (:func:`fastprompt.adapter_registry` finds it). Every prefix the
model runs goes through it, a ``PeftModel``'s active adapter included (the case where every row names it).
It maps names to prefixes, each with its :class:`~fastprompt.methods.PromptMethod`:

- fixed K/V blocks: a loaded prefix-tuning adapter, a cached prompt, a loaded exported prefix;
- prefixes derived from a PEFT prompt encoder: a prefix-tuning adapter's K/V, or the virtual tokens of a
  P-tuning / prompt-tuning adapter run once through the frozen model (a compiled soft prompt), recomputed only
  when the encoder's parameters change (an in-place update bumps a tensor's ``_version``; a replaced tensor
  changes its identity), when the model moves to another dtype or device, or after
  :meth:`AdapterRegistry.invalidate` (needed after writes through ``param.data``, which no version counter
  sees, or after changing the base model's weights);
- on a ``peft.PeftModel``, its own prompt-learning adapters, looked up by name in the model at every use,
  so PEFT's ``load_adapter`` / ``delete_adapter`` show through.

``"__base__"`` names no prefix (PEFT's convention). :meth:`AdapterRegistry.batch` turns one name per batch
row into the forward's :class:`~fastprompt.PrefixKV` (a bank of the distinct prefixes the batch uses, each
held once, plus each row's bank row) and each row's position offset.

Why this lives in ``hf/`` and not in ``serving/``: the patched forward resolves every row's prefix through it
(training a PeftModel's active adapter as much as serving named ones), so it sits below the patch;
:mod:`fastprompt.serving` holds the public functions that fill it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from fastprompt.encoders import EncoderCache
from fastprompt.encoders.cache import state_key
from fastprompt.errors import UnsupportedModelError
from fastprompt.hf import compat
from fastprompt.hf.soft_prompts import leading_kv
from fastprompt.methods import Output, PromptMethod
from fastprompt.methods.peft_format import is_prompt_learning, method_of
from fastprompt.prefix.bank import KVGeometry, row_offsets, row_position_ids, stack_prefixes
from fastprompt.prefix.kv import PrefixKV

__all__ = ["BASE", "AdapterRegistry", "BatchPrefix", "base_model_of"]

BASE = "__base__"


def base_model_of(model: Any) -> PreTrainedModel:
    """The ``transformers`` model that runs: ``model`` itself, or a ``PeftModel``'s base model."""
    base = model.get_base_model() if compat.is_peft_model(model) else model
    if not isinstance(base, PreTrainedModel):
        raise UnsupportedModelError(
            f"serving takes a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}"
        )
    return base


def _trainable(encoder: torch.nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())


class _FixedEntry:
    """A K/V block [L, 2, Hkv, P, D] that never changes."""

    def __init__(self, kv: torch.Tensor, kind: str) -> None:
        self.kind = kind
        self._kv = kv

    def kv(self, base: PreTrainedModel) -> torch.Tensor:
        return self._kv

    def invalidate(self) -> None:
        """Nothing is derived, so nothing goes stale."""


class _EncodedEntry:
    """A prefix derived from a PEFT prompt encoder and its config, by the config's method.

    :meth:`kv` is kept while the encoder's parameters and the model's dtype and device stay the same, and
    recomputed otherwise. A compiled soft prompt is a serving artefact (no gradient); a method that yields
    K/V itself, with trainable parameters under autograd, gives fresh, differentiable K/V every call.
    """

    def __init__(self, encoder: torch.nn.Module, config: Any, method: PromptMethod, cache: EncoderCache) -> None:
        self.encoder = encoder
        self.config = config
        self.method = method
        self.kind = method.name
        self._cache = cache  # the registry's: the encoder's output and its tokens' device copy
        self._key: tuple | None = None
        self._kv: torch.Tensor | None = None

    def _state(self, base: PreTrainedModel) -> tuple:
        # the encoder cache's key, plus what the K/V also depend on: the model's dtype and device
        return state_key(self.encoder, None), base.dtype, base.device

    def produce(self, base: PreTrainedModel) -> torch.Tensor:
        """What the method yields (differentiable under autograd), in ``base``'s dtype."""
        return self.method.produce(self.encoder, self.config, self._cache).to(base.dtype)

    def kv(self, base: PreTrainedModel) -> torch.Tensor:
        trainable = _trainable(self.encoder)
        if self.method.output is Output.KV and trainable:
            # Training: the K/V must carry this forward's graph back to the encoder, so they are never reused.
            return self.produce(base)
        if self.method.output is not Output.KV and trainable and base.training:
            raise UnsupportedModelError(
                f"a {self.method} adapter in adapter_names is served as a compiled soft prompt (keys and "
                "values computed once, without gradient), so it cannot be trained that way: train it as the "
                "PeftModel's active adapter without adapter_names, or call model.eval() to serve it"
            )
        key = self._state(base)
        if self._kv is not None and key == self._key:
            return self._kv
        with torch.no_grad():
            kv = leading_kv(base, self.method, self.method.produce(self.encoder, self.config, self._cache))
        self._key, self._kv = key, kv
        return kv

    def invalidate(self) -> None:
        self._key = self._kv = None
        self._cache.clear(self.encoder)  # its output is kept there under the same blind spot (param.data)


@dataclass(frozen=True)
class BatchPrefix:
    """What a forward needs for one batch's adapter names.

    ``prefix``: the :class:`~fastprompt.PrefixKV` to pass as ``fastprompt_prefix`` (``None`` when every row is
    ``"__base__"``; a bank of one row and no ``prefix_index`` when every row names the same prefix).
    ``offsets``: [B] int64, each row's prefix length (0 for ``"__base__"``): its first real token's position.
    """

    prefix: PrefixKV | None
    offsets: torch.Tensor

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, S] position ids for a padded batch ``attention_mask`` [B, S]; see :func:`row_position_ids`."""
        return row_position_ids(self.offsets.to(attention_mask.device), attention_mask)

    @property
    def rows_differ(self) -> bool:
        """Whether rows read different prefixes (or some none): then each row has its own bank row."""
        return self.prefix is not None and self.prefix.prefix_index is not None


class AdapterRegistry:
    """Named prefixes of one model; see the module docstring. Get it with :func:`fastprompt.adapter_registry`.

    The registry refers to its model weakly, so it never keeps the model alive.
    """

    def __init__(self, model: Any) -> None:
        self._model = weakref.ref(model)
        self._entries: dict[str, _FixedEntry | _EncodedEntry] = {}
        self._peft_entries: dict[str, _EncodedEntry] = {}
        # the outputs of every encoder behind these prefixes (and their tokens' device copies): they live and
        # die with the registry, that is with the patch
        self.encoder_cache = EncoderCache()
        # The last batch's bank: rebuilt only when its names or their K/V change (a generation's steps reuse it).
        self._last_bank: tuple[tuple[str, ...], tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor] | None = None

    # -- the model ------------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this adapter registry no longer exists")
        return model

    @property
    def base(self) -> PreTrainedModel:
        return base_model_of(self.model)

    @property
    def geometry(self) -> KVGeometry:
        """The key/value geometry every registered prefix has."""
        return KVGeometry.from_config(self.base.config)

    def _peft_configs(self) -> dict[str, Any]:
        model = self.model
        return dict(model.peft_config) if compat.is_peft_model(model) else {}

    # -- names ----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every name :meth:`batch` accepts besides ``"__base__"``: registered ones, then a PeftModel's own
        prompt-learning adapters."""
        own = [name for name, config in self._peft_configs().items() if is_prompt_learning(config)]
        return [*self._entries, *own]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._peft_configs()

    def check_new_name(self, name: str) -> None:
        """Raise ``ValueError`` unless ``name`` can name a new prefix (a non-empty string not in use)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved: it names no prefix")
        if name in self:
            where = "an adapter of this PeftModel" if name in self._peft_configs() else "registered on this model"
            raise ValueError(f"adapter name {name!r} is already used ({where}); remove it first or pick another name")

    # -- registering ----------------------------------------------------------------------------------

    def add_kv(self, name: str, kv: torch.Tensor, kind: str) -> None:
        """Register a fixed K/V block ``kv`` [L, 2, Hkv, P, D] of this model's geometry under ``name``; ``kind``
        says where it came from (a method's name, or an exported prefix's kind).

        It is moved to the model's device and dtype (once, here) and detached.
        """
        self.check_new_name(name)
        self.geometry.check_block(kv, f"prefix {name!r}")
        base = self.base
        self._entries[name] = _FixedEntry(kv.detach().to(device=base.device, dtype=base.dtype), kind)

    def add_encoder(self, name: str, encoder: torch.nn.Module, config: Any, method: PromptMethod) -> None:
        """Register a PEFT prompt encoder and its config under ``name``; its prefix is derived at first use."""
        self.check_new_name(name)
        self._entries[name] = _EncodedEntry(encoder, config, method, self.encoder_cache)

    def remove(self, name: str) -> None:
        """Forget a registered prefix (a PeftModel's own adapters are PEFT's to delete)."""
        if name not in self._entries:
            raise KeyError(f"no prefix named {name!r} is registered on this model; registered: {list(self._entries)}")
        del self._entries[name]
        self._last_bank = None

    def invalidate(self, name: str | None = None) -> None:
        """Recompute the derived K/V of ``name`` (every prefix if None) at next use."""
        entries = [*self._entries.values(), *self._peft_entries.values()] if name is None else [self.entry(name)]
        for entry in entries:
            entry.invalidate()
        self._last_bank = None

    # -- lookup ---------------------------------------------------------------------------------------

    def entry(self, name: str) -> _FixedEntry | _EncodedEntry:
        """The prefix named ``name``: its ``method`` and ``kv(base)`` (an encoded one also ``produce(base)``)."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        config = self._peft_configs().get(name)
        if config is None:
            raise ValueError(f"unknown adapter name {name!r}; this model serves {[BASE, *self.names()]}")
        method = method_of(config, f"adapter {name!r} of this PeftModel", "adapter_names")
        encoder = compat.peft_prompt_encoder(self.model, name)
        entry = self._peft_entries.get(name)
        if entry is None or entry.encoder is not encoder or entry.config is not config:
            entry = self._peft_entries[name] = _EncodedEntry(encoder, config, method, self.encoder_cache)
        return entry

    def kind(self, name: str) -> str:
        """Where the prefix ``name`` comes from: ``"prefix_tuning"``, ``"p_tuning"``, ``"cached_prompt"``, ..."""
        return self.entry(name).kind

    def kv(self, name: str) -> torch.Tensor:
        """The K/V block [L, 2, Hkv, P, D] of ``name`` (computed if it is derived and stale). Read-only."""
        return self.entry(name).kv(self.base)

    # -- batches --------------------------------------------------------------------------------------

    def batch(self, adapter_names: Sequence[str], batch_size: int) -> BatchPrefix:
        """The prefix bank and row offsets of a batch of ``batch_size`` rows, row ``i`` using ``adapter_names[i]``.

        The bank holds each distinct prefix of the batch once (no copy at all when one prefix serves every
        row: then the bank is a view of it and there is no ``prefix_index``); it is reused as long as the
        batch names the same prefixes in the same first-use order and none has changed.
        """
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ValueError(f"adapter_names must be a list with one name per batch row, got {adapter_names!r}")
        if len(adapter_names) != batch_size:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} names but the batch has {batch_size} rows; give one name "
                f"per row ({BASE!r} for none)"
            )
        used = list(dict.fromkeys(name for name in adapter_names if name != BASE))
        base = self.base
        if not used:
            return BatchPrefix(prefix=None, offsets=torch.zeros(batch_size, dtype=torch.int64, device=base.device))
        blocks = tuple(self.kv(name) for name in used)
        if len(used) == 1 and BASE not in adapter_names:
            kv = blocks[0]
            offsets = torch.full((batch_size,), kv.shape[3], dtype=torch.int64, device=kv.device)
            return BatchPrefix(prefix=PrefixKV(kv.unsqueeze(2)), offsets=offsets)
        bank, lens = self._bank(tuple(used), blocks)
        row_of = {name: i for i, name in enumerate(used)} | {BASE: -1}
        index = torch.tensor([row_of[name] for name in adapter_names], dtype=torch.int32, device=bank.device)
        return BatchPrefix(prefix=PrefixKV(bank, prefix_index=index, prefix_lens=lens),
                           offsets=row_offsets(index, lens))

    def _bank(self, names: tuple[str, ...], blocks: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last_bank
        if last is not None and last[0] == names and all(a is b for a, b in zip(last[1], blocks, strict=True)):
            return last[2], last[3]
        bank, lens = stack_prefixes(blocks)
        # Autograd results are fresh every forward; keeping them would hold their graph.
        self._last_bank = None if bank.requires_grad else (names, blocks, bank, lens)
        return bank, lens
