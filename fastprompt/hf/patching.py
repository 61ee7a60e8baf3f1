"""``fastprompt.patch(model)`` / ``fastprompt.unpatch(model)``: one line that puts a model on the fast path.

A plain ``transformers`` model gets the ``"fastprompt"`` attention implementation (a prefix can then be passed
as the ``fastprompt_prefix`` forward kwarg). A ``peft.PeftModel`` whose active adapter is prompt learning
additionally has ``forward`` and ``generate`` replaced on the instance. Both kinds of patched model take
``adapter_names=[...]`` (one name per batch row, ``"__base__"`` for none) in ``forward`` and ``generate``.

One path serves every prefix: each row's name is looked up in the patch's adapter registry
(:mod:`fastprompt.hf.registry`), which asks the name's prompt-learning method (:mod:`fastprompt.methods`) what
it produces. A ``PeftModel`` without ``adapter_names`` is the case where every row names its active adapter.
Neither path calls PEFT's forward, ``get_prompt``, ``prepare_inputs_for_generation`` or generate plumbing: they
read the adapter (config and prompt encoder; see :mod:`fastprompt.hf.compat`) and drive the base model through
stable ``transformers`` inputs. Without ``adapter_names`` a plain model's ``forward`` and ``generate`` are the
originals.

- A method that yields per-layer K/V (prefix tuning, P-tuning v2, cached prompts): the K/V are formed once
  (batch 1) and reach attention as ``fastprompt_prefix``, never copied per row nor put into the KV cache.
- A method that yields virtual-token embeddings (P-tuning, prompt tuning) trains by prepending them: the
  active adapter's ``forward`` prepends them through ``inputs_embeds``, with the attention mask,
  ``token_type_ids`` and (causal LM, token classification) ``labels`` widened by ``P`` as PEFT does, so outputs
  have PEFT's shapes (logits over ``P + T`` positions). In ``generate`` and for named rows they are served
  compiled: the virtual tokens run once (batch 1) through the frozen model and their per-layer K/V are the
  prefix (causal models only); the KV cache holds real tokens only.

Positions (always passed explicitly as ``position_ids``). A row's tokens are numbered from its first real
token: leading padding is skipped, every later token counts. The numbers are then shifted by the row's
offset, its prefix length or its number of virtual tokens (the virtual tokens themselves take ``0 .. P-1``).
Models with RoBERTa-style embeddings count from ``padding_idx + 1`` and give padding ``padding_idx``.
So a left-padded row gives what it gives alone, in ``forward`` and in ``generate``; with right padding or
none the positions are PEFT's. ``position_ids`` given by the caller ([B, T] or [1, T]) are the row's own
numbering, as the model would take them without an adapter; they replace the numbering from the mask and
are shifted by the offset likewise (PEFT shifts them for prefix tuning and ignores them for P-tuning and
prompt tuning). ``unpatch`` puts back exactly what was there.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import PreTrainedModel

from fastprompt.encoders import prepare_encoders
from fastprompt.errors import UnsupportedModelError
from fastprompt.hf import checkpoints, compat
from fastprompt.hf.attention import ATTN_IMPLEMENTATION, LAYER_LOG_KWARG, PREFIX_KWARG, PrefixCache
from fastprompt.hf.registry import AdapterRegistry, BatchPrefix
from fastprompt.hf.state import PatchState, adapter_registry, patch_state
from fastprompt.methods import ModelFit, Training
from fastprompt.methods.peft_format import method_of
from fastprompt.prefix.bank import row_position_ids
from fastprompt.prefix.kv import PrefixKV

__all__ = ["patch", "unpatch", "token_positions"]

# Task types whose labels are per token, so PEFT widens them by the virtual tokens.
_TOKEN_LABEL_TASKS = ("CAUSAL_LM", "TOKEN_CLS")


def _check_transformers_model(model: PreTrainedModel) -> None:
    """Raise :class:`UnsupportedModelError` unless the op can stand in for every attention call."""
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not dispatch its attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so fastprompt cannot route it"
        )
    config = model.config.get_text_config()
    if getattr(model.config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder or cross-attention model; not supported")
    reasons = []
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        reasons.append(f"sliding-window attention (sliding_window={config.sliding_window})")
    if getattr(config, "attention_chunk_size", None) is not None:
        reasons.append("chunked attention")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        reasons.append("attention logit soft-capping")
    other_layers = set(getattr(config, "layer_types", None) or ()) - {"full_attention"}
    if other_layers:
        reasons.append(f"layer types {sorted(other_layers)}")
    if reasons:
        raise UnsupportedModelError(
            f"{name} uses {', '.join(reasons)}, which the prefix-attention op does not express "
            "(for sliding windows longer than every sequence, set config.sliding_window = None first)"
        )


def _check_peft_model(model: Any) -> None:
    """Raise unless the active adapter is a prompt-learning method that fits the base model."""
    name = model.active_adapter
    what = f"the active adapter {name!r}"
    method = method_of(compat.peft_active_config(model), what)
    base = model.get_base_model()
    _check_transformers_model(base)
    method.check_fits(compat.peft_active_config(model), ModelFit.of(base), what, compiled=False)


def token_positions(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    offsets: torch.Tensor,
    length: int,
    rule: tuple[int, int | None] = (0, None),
) -> torch.Tensor:
    """Position ids [B, T] of the real tokens of each row, numbered after the row's prefix.

    attention_mask [B, T] (1 = real token) or ``None``; position_ids [B, T] or [1, T]: the caller's own
    numbering (replaces the one from the mask) or ``None``; offsets [B]: positions in front of each row;
    rule: ``compat.position_rule`` of the model (first position, id of padding). See the module docstring.
    """
    if position_ids is not None:
        steps = position_ids.to(offsets.device).expand(offsets.shape[0], -1)
        positions = steps + offsets[:, None]
    elif attention_mask is None:
        positions = torch.arange(length, device=offsets.device) + offsets[:, None]
    else:
        positions = row_position_ids(offsets, attention_mask)
    first, padding = rule
    positions = positions + first
    if padding is not None and attention_mask is not None:
        positions = positions.masked_fill(attention_mask == 0, padding)
    return positions


def _check_checkpointing(model: torch.nn.Module) -> None:
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if (
            getattr(module, "gradient_checkpointing", False)
            and isinstance(func, functools.partial)
            and func.keywords.get("use_reentrant") is True
        ):
            raise ValueError(
                "prefix tuning under fastprompt needs non-reentrant gradient checkpointing: call "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "(reentrant checkpointing cannot carry gradients to the prefix, which is not a layer input)"
            )


def _stores_cache(base: Any, use_cache: bool | None) -> bool:
    """Whether the base model would fill a KV cache in this forward, as transformers decides it."""
    if use_cache is not None:
        return use_cache
    # A training forward's cache is never read; not storing it saves a copy of every layer's K and V.
    return bool(getattr(base.config, "use_cache", False)) and not base.training


def _check_prefix_reached_every_layer(base: Any, prefix: PrefixKV, layer_log: set[int]) -> None:
    missing = set(range(prefix.bank.shape[0])) - layer_log
    if missing:
        raise UnsupportedModelError(
            f"{type(base).__name__} did not hand the prefix to the attention of layers {sorted(missing)} (its "
            "layers do not pass forward keyword arguments down to attention), so this forward would have run "
            "without the prefix there"
        )


def _prepend(tensor: torch.Tensor | None, count: int, value: float) -> torch.Tensor | None:
    """``tensor`` [B, T] with ``count`` columns of ``value`` in front, or ``None``."""
    if tensor is None:
        return None
    return torch.cat([tensor.new_full((tensor.shape[0], count), value), tensor], dim=1)


def _refuse_unsupported_inputs(kwargs: dict[str, Any]) -> None:
    if kwargs.pop("task_ids", None) is not None:
        raise UnsupportedModelError("task_ids (multitask prompt tuning) is not supported by fastprompt.patch")
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        raise UnsupportedModelError(
            "a patched PEFT model builds its own KV cache (the prefix is never stored in it); pass no cache"
        )


def _patched_forward(
    model: Any,
    original: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    adapter_names: list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A patched PeftModel's forward: its active adapter on every row, or one named prefix per row."""
    _refuse_unsupported_inputs(kwargs)
    base = model.get_base_model()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
              "labels": labels, "position_ids": position_ids}
    if adapter_names is None:
        active = model.active_adapter
        entry = adapter_registry(model).entry(active)
        if entry.method.training is Training.PREPEND:
            return _prepended_forward(model, base, entry.produce(base), **inputs, **kwargs)
        adapter_names = [active] * _batch_size(input_ids, inputs_embeds)
    return _named_forward(model, base, adapter_names, **inputs, **kwargs)


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None:
        raise ValueError("pass input_ids or inputs_embeds")
    return tokens.shape[0]


def _prepended_forward(
    model: Any,
    base: Any,
    virtual: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """The forward of a method that trains by prepending: ``virtual`` [P, hidden] in front of every row's input
    embeddings, numbered ``0 .. P - 1``, the row's tokens after them (PEFT's shapes and positions)."""
    batch = _batch_size(input_ids, inputs_embeds)
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    count = virtual.shape[0]
    offsets = torch.full((batch,), count, dtype=torch.long, device=virtual.device)
    rule = compat.position_rule(base)
    positions = token_positions(attention_mask, position_ids, offsets, length, rule)
    _use_cache(base, kwargs)
    if inputs_embeds is None:
        inputs_embeds = base.get_input_embeddings()(input_ids)
    first, _ = rule
    virtual_positions = torch.arange(first, first + count, device=positions.device).expand(batch, -1)
    if compat.peft_active_config(model).task_type in _TOKEN_LABEL_TASKS:
        labels = _prepend(labels, count, -100)
    kwargs["token_type_ids"] = _prepend(kwargs.get("token_type_ids"), count, 0)
    if kwargs["token_type_ids"] is None:
        del kwargs["token_type_ids"]
    return base(
        inputs_embeds=torch.cat([virtual.to(inputs_embeds.dtype)[None].expand(batch, -1, -1), inputs_embeds], dim=1),
        attention_mask=_prepend(attention_mask, count, 1),
        position_ids=torch.cat([virtual_positions, positions], dim=1),
        labels=labels,
        **kwargs,
    )


def _prepare_inputs_with_prefix(base: Any, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The base model's ``prepare_inputs_for_generation``, plus the prefix of a :class:`PrefixCache` in use.

    The prefix travels with the generation's cache rather than as a generate argument, which transformers
    would refuse as unknown to the model's forward.
    """
    model_inputs = original(*args, **kwargs)
    cache = compat.output_cache(model_inputs)
    if isinstance(cache, PrefixCache):
        model_inputs[PREFIX_KWARG] = cache.prefix
    return model_inputs


def _patched_generate(model: Any, original: Any, *args: Any, adapter_names: list[str] | None = None,
                      **kwargs: Any) -> Any:
    """A patched PeftModel's generate: its active adapter on every row (compiled where the method yields
    virtual tokens), or one named prefix per row."""
    _refuse_unsupported_inputs(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    if adapter_names is None:
        adapter_names = [model.active_adapter] * _generate_input_ids(kwargs).shape[0]
    base = model.get_base_model()
    return _named_generate(model, base, base.generate, adapter_names, kwargs)


def _generate_input_ids(kwargs: dict[str, Any]) -> torch.Tensor:
    input_ids = kwargs.get("input_ids")
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise UnsupportedModelError("generate on a patched model takes input_ids (not inputs_embeds)")
    return input_ids


def _named_forward(
    model: Any,
    base: Any,
    adapter_names: list[str],
    *,
    run: Any = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """A forward whose row ``i`` runs with the prefix named ``adapter_names[i]`` (``"__base__"``: none).

    The registry of ``model`` gives the batch's bank (each distinct prefix once) and each row's prefix
    length; positions are numbered per row from that length and the row's own padding (see the module
    docstring). ``run`` is the callable that runs ``base`` (default ``base`` itself). Virtual-token rows read
    compiled soft prompts (causal models only), so outputs have the batch's own ``T`` positions. The KV cache
    this forward returns counts the prefix in its length when one prefix serves every row (as PEFT's cache,
    which holds it, does) and the stored tokens only otherwise.
    """
    batch = _batch_size(input_ids, inputs_embeds)
    tokens = input_ids if input_ids is not None else inputs_embeds
    length = tokens.shape[1]
    if base.training and torch.is_grad_enabled():
        _check_checkpointing(base)
    served = adapter_registry(model).batch(adapter_names, batch)
    positions = token_positions(attention_mask, position_ids, served.offsets.to(tokens.device), length,
                                compat.position_rule(base))[:, -length:]
    stores = _use_cache(base, kwargs)
    run = base if run is None else run
    inputs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
              "position_ids": positions}
    if served.prefix is None:
        return run(**inputs, **kwargs)
    cache_name = compat.cache_kwarg(base)
    if stores and kwargs.get(cache_name) is None:
        kwargs[cache_name] = PrefixCache(served.prefix, store=True, count_prefix=not served.rows_differ)
    return _run_with_prefix(base, run, served.prefix, **inputs, **kwargs)


def _named_generate(model: Any, base: Any, run: Any, adapter_names: list[str], kwargs: dict[str, Any]) -> Any:
    """``run(**kwargs)`` (a ``generate``) with row ``i`` served by the prefix named ``adapter_names[i]``.

    The rows' prefixes travel in a :class:`PrefixCache` that stores real tokens only; each row's positions
    start at its own prefix length and skip its own leading padding, and transformers extends them by one
    per step.
    """
    input_ids = _generate_input_ids(kwargs)
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        raise UnsupportedModelError("generate with adapter_names builds its own KV cache; pass no cache")
    with torch.no_grad():
        served = adapter_registry(model).batch(adapter_names, input_ids.shape[0])
    config = kwargs.get("generation_config") or base.generation_config
    for name in ("num_beams", "num_return_sequences"):
        if served.rows_differ and (kwargs.get(name) or getattr(config, name, 1) or 1) > 1:
            raise UnsupportedModelError(
                f"generate with adapter_names that differ between rows runs one sequence per row; {name} > 1 would "
                "multiply the rows (repeat each row and its name in the batch instead)"
            )
    return _generate_with_prefix(base, run, served, kwargs)


def _use_cache(base: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this forward stores a KV cache (the caller's ``use_cache`` or the model's default); sets
    ``use_cache`` in ``kwargs`` where ``base``'s forward takes it."""
    stores = _stores_cache(base, kwargs.pop("use_cache", None))
    if compat.forward_accepts(base, "use_cache"):
        kwargs["use_cache"] = stores
    return stores


def _run_with_prefix(base: Any, run: Any, prefix: PrefixKV, /, **inputs: Any) -> Any:
    """``run(**inputs)`` (``base`` or its original forward) with ``prefix`` handed to every attention layer, and
    a check that every layer received it."""
    layer_log: set[int] = set()
    output = run(**inputs, **{PREFIX_KWARG: prefix, LAYER_LOG_KWARG: layer_log})
    _check_prefix_reached_every_layer(base, prefix, layer_log)
    return output


def _generate_with_prefix(base: Any, run: Any, served: BatchPrefix, kwargs: dict[str, Any]) -> Any:
    """``run(**kwargs)`` (a ``generate``) with each row numbered after its offset and the batch's prefix (if
    any) travelling in a cache that stores real tokens only."""
    input_ids = kwargs["input_ids"]
    kwargs["position_ids"] = token_positions(
        kwargs.get("attention_mask"), kwargs.get("position_ids"), served.offsets.to(input_ids.device),
        input_ids.shape[1], compat.position_rule(base),
    )
    # Positions are explicit, so the cache counts the stored tokens only: transformers releases that take
    # the prompt's uncached part from the cache length then feed the whole prompt on the first step.
    if served.prefix is not None:
        kwargs[compat.cache_kwarg(base)] = PrefixCache(served.prefix, store=True, count_prefix=False)
    return run(**kwargs)


def _plain_forward(model: Any, original: Any, *args: Any, adapter_names: list[str] | None = None,
                   **kwargs: Any) -> Any:
    """A patched plain model's forward: as before, or with one named prefix per row (``adapter_names``)."""
    if adapter_names is None:
        return original(*args, **kwargs)
    if kwargs.get(PREFIX_KWARG) is not None:
        raise ValueError(f"pass either adapter_names or {PREFIX_KWARG}, not both")
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise ValueError("with adapter_names, pass the inputs by keyword (input_ids=..., attention_mask=...)")
        kwargs["input_ids"] = args[0]
    return _named_forward(model, model, adapter_names, run=original, **kwargs)


def _plain_generate(model: Any, original: Any, *args: Any, adapter_names: list[str] | None = None,
                    **kwargs: Any) -> Any:
    """A patched plain model's generate: as before, or with one named prefix per row (``adapter_names``)."""
    if adapter_names is None:
        return original(*args, **kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    return _named_generate(model, model, original, adapter_names, kwargs)


def _set_attn_implementation(model: PreTrainedModel, implementation: str) -> None:
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        raise UnsupportedModelError(
            f"{type(model).__name__} refused attn_implementation={implementation!r} "
            f"(it kept {model.config._attn_implementation!r})"
        )


def patch(model: Any) -> Any:
    """Put ``model`` on fastprompt's fast path, in place, and return it. Patching twice is harmless.

    ``model``: a ``peft.PeftModel`` whose active adapter is one of the prompt-learning methods of
    :mod:`fastprompt.methods` (prefix tuning with or without projection, P-tuning with an MLP or LSTM encoder,
    prompt tuning), for any task type (causal LM, sequence or token classification); or a plain
    ``transformers`` ``PreTrainedModel``. Results equal the unpatched model's; see the module docstring.
    Either then serves named prefixes (``fastprompt.load_adapter``, ``cache_prompt``, a PeftModel's own
    adapters) per batch row through ``adapter_names=[...]`` in ``forward`` and ``generate``.

    A ``PeftModel``'s checkpoints also keep its prompt encoders (:func:`fastprompt.enable_encoder_checkpoints`),
    so the ``Trainer``'s ``load_best_model_at_end`` and ``resume_from_checkpoint`` restore what was saved.

    Raises :class:`~fastprompt.UnsupportedModelError` (saying why) for anything else: attention not
    dispatched through ``ALL_ATTENTION_FUNCTIONS``, sliding-window / chunked / soft-capped attention,
    encoder-decoder models, adapters of other types; an adapter made for another model's dimensions is refused
    naming the one that differs (:class:`~fastprompt.methods.AdapterFitError`).
    """
    if patch_state(model) is not None:
        return model
    if compat.is_peft_model(model):
        _check_peft_model(model)
        prepare_encoders(model)
        base = model.get_base_model()
        state = PatchState(base, base.config._attn_implementation, AdapterRegistry(model),
                           encoder_checkpoints=not checkpoints.encoder_checkpoints_enabled(model))
        checkpoints.enable_encoder_checkpoints(model)
        _set_attn_implementation(base, ATTN_IMPLEMENTATION)
        state.swaps.wrap(model, "forward", _patched_forward, keep_signature=True)
        if hasattr(model, "prepare_inputs_for_generation"):  # the task types PEFT lets generate
            state.swaps.wrap(model, "generate", _patched_generate, keep_signature=True)
    elif isinstance(model, PreTrainedModel):
        _check_transformers_model(model)
        base = model
        state = PatchState(base, model.config._attn_implementation, AdapterRegistry(model))
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
        state.swaps.wrap(model, "forward", _plain_forward, keep_signature=True)
        if hasattr(model, "generate"):
            state.swaps.wrap(model, "generate", _plain_generate, keep_signature=True)
    else:
        raise UnsupportedModelError(
            f"fastprompt.patch takes a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}"
        )
    if hasattr(base, "prepare_inputs_for_generation"):
        state.swaps.wrap(base, "prepare_inputs_for_generation", _prepare_inputs_with_prefix, keep_signature=True)
    state.attach(model)
    return model


def unpatch(model: Any) -> Any:
    """Undo :func:`patch` exactly (attention implementation, replaced methods, the encoder checkpoints it turned
    on; the prefixes registered for ``adapter_names`` are dropped with the patch); a no-op if not patched."""
    state = PatchState.detach(model)
    if state is None:
        return model
    state.swaps.restore()
    if state.encoder_checkpoints:
        checkpoints.disable_encoder_checkpoints(model)
    state.base.set_attn_implementation(state.attn_implementation)
    return model
