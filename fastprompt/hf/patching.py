"""``fastprompt.patch(model)`` / ``fastprompt.unpatch(model)``: one line that puts a model on the fast path.

A plain ``transformers`` model gets the ``"fastprompt"`` attention implementation (a prefix can then be passed
as the ``fastprompt_prefix`` forward kwarg). A ``peft.PeftModel`` whose active adapter is prompt learning
additionally has ``forward`` and ``generate`` replaced on the instance. Both kinds of patched model take
``adapter_names=[...]`` (one name per batch row, ``"__base__"`` for none) in ``forward`` and ``generate``: each
row then runs with the prefix its name has in the patch's adapter registry (:mod:`fastprompt.hf.adapters`),
numbered from its own prefix length; P-tuning / prompt-tuning rows read compiled soft prompts (causal models
only). Without ``adapter_names`` a plain model's ``forward`` and ``generate`` are the originals. Neither
calls PEFT's forward, ``get_prompt``, ``prepare_inputs_for_generation`` or generate plumbing: they read the
adapter (config, ``prompt_encoder[name]``, ``prompt_tokens``; see :mod:`fastprompt.hf.compat`) and drive the
base model through stable ``transformers`` inputs, following a :class:`ForwardPlan` (per batch row: its
prefix bank row or none and the number of positions in front of its real tokens; its virtual-token
embeddings or none):

- prefix tuning / P-tuning v2: the encoder runs once (batch 1) and its per-layer K/V reach attention as
  ``fastprompt_prefix``, never copied per row nor put into the KV cache;
- P-tuning / prompt tuning, ``forward``: the virtual-token embeddings are prepended through
  ``inputs_embeds``, with the attention mask, ``token_type_ids`` and (causal LM, token classification)
  ``labels`` widened by ``P`` as PEFT does, so outputs have PEFT's shapes (logits over ``P + T`` positions);
- P-tuning / prompt tuning, ``generate``: the virtual tokens run once (batch 1) through the frozen model
  and their per-layer K/V are served as the prefix; the KV cache holds real tokens only.

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
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from fastprompt.encoders import encode_prompt, prepare_encoders
from fastprompt.errors import UnsupportedModelError
from fastprompt.hf import checkpoints, compat
from fastprompt.hf.adapters import PATCH_STATE_ATTR, AdapterRegistry, adapter_registry
from fastprompt.hf.attention import ATTN_IMPLEMENTATION, LAYER_LOG_KWARG, PREFIX_KWARG, PrefixCache
from fastprompt.hf.soft_prompts import prompt_kv
from fastprompt.hf.swaps import Swaps
from fastprompt.prefix.bank import row_position_ids
from fastprompt.prefix.kv import PrefixKV
from fastprompt.prefix.peft import PREFIX_TYPES, SOFT_PROMPT_TYPES

__all__ = ["ForwardPlan", "patch", "unpatch", "prefix_from_peft", "token_positions"]

_STATE_ATTR = PATCH_STATE_ATTR
# Task types whose labels are per token, so PEFT widens them by the virtual tokens.
_TOKEN_LABEL_TASKS = ("CAUSAL_LM", "TOKEN_CLS")


@dataclass
class _PatchState:
    base: PreTrainedModel
    attn_implementation: str
    # the named prefixes adapter_names can use; they live as long as the patch
    registry: AdapterRegistry
    # the methods replaced on the model (and its base model)
    swaps: Swaps = field(default_factory=Swaps)
    # whether patch() turned on checkpoints.enable_encoder_checkpoints (so unpatch() turns it off)
    encoder_checkpoints: bool = False


@dataclass(frozen=True)
class ForwardPlan:
    """What each batch row of one forward runs with.

    ``prefix``: the per-layer K/V bank and each row's bank row (-1: none), or ``None``.
    ``offsets``: [B] int, the positions in front of each row's real tokens (its prefix length, or its
    number of virtual tokens). ``virtual``: [B, P, H] virtual-token embeddings prepended to each row (any
    strides, e.g. one encoder output expanded), or ``None``. A single adapter is the case where every row
    names bank row 0 or the same embeddings.
    """

    prefix: PrefixKV | None
    offsets: torch.Tensor
    virtual: torch.Tensor | None = None


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


def _kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a decoder or encoder config."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def _check_peft_model(model: Any) -> None:
    peft_config = model.active_peft_config
    peft_type = compat.peft_type(peft_config)
    if peft_type not in PREFIX_TYPES + SOFT_PROMPT_TYPES:
        raise UnsupportedModelError(
            f"the active adapter {model.active_adapter!r} is {peft_type}; fastprompt accelerates "
            "PREFIX_TUNING, P_TUNING and PROMPT_TUNING adapters"
        )
    if (peft_config.num_transformer_submodules or 1) != 1:
        raise UnsupportedModelError("prompt learning on encoder-decoder models is not supported")
    _check_transformers_model(model.get_base_model())
    if peft_type in PREFIX_TYPES:
        layers, kv_heads, head_dim = _kv_geometry(model.get_base_model().config)
        want = (peft_config.num_layers, peft_config.num_attention_heads,
                peft_config.token_dim // peft_config.num_attention_heads)
        if want != (layers, kv_heads, head_dim):
            raise UnsupportedModelError(
                f"the prefix adapter provides (layers, kv heads, head size) = {want} but the model's attention "
                f"uses {(layers, kv_heads, head_dim)}"
            )


def _prompt_encoder_output(model: Any) -> torch.Tensor:
    """What the active adapter's encoder yields for one batch row, computed once: [P, out_dim]."""
    name = model.active_adapter
    # PEFT keeps the tokens on the CPU; encode_prompt checks them there and keeps one device copy
    return encode_prompt(compat.peft_prompt_encoder(model, name), compat.peft_prompt_tokens(model, name))


def prefix_from_peft(model: Any) -> PrefixKV:
    """The active prefix-tuning adapter's per-layer K/V as one bank [L, 2, 1, Hkv, P, D] (a view).

    Runs the prefix encoder (embedding, and the projection MLP when the adapter has one) once.
    """
    peft_config = compat.peft_active_config(model)
    flat = _prompt_encoder_output(model).to(model.get_base_model().dtype)
    heads = peft_config.num_attention_heads
    shape = (peft_config.num_virtual_tokens, peft_config.num_layers, 2, heads, peft_config.token_dim // heads)
    # PEFT lays the encoder output out as [P, (layer, k|v), head, dim]; permuting gives the bank.
    return PrefixKV(flat.view(shape).permute(1, 2, 3, 0, 4).unsqueeze(2))


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


def _plan(model: Any, batch: int, device: torch.device, *, serving: bool) -> ForwardPlan:
    """The :class:`ForwardPlan` of the active adapter for ``batch`` rows.

    ``serving``: P-tuning / prompt tuning become a prefix too (their virtual tokens run once through the
    frozen model), which is exact for causal models only and is what ``generate`` uses.
    """
    peft_config = compat.peft_active_config(model)
    offsets = torch.full((batch,), peft_config.num_virtual_tokens, dtype=torch.long, device=device)
    if compat.peft_type(peft_config) in PREFIX_TYPES:
        return ForwardPlan(prefix_from_peft(model), offsets)
    if serving:
        return ForwardPlan(_virtual_token_prefix(model), offsets)
    virtual = _prompt_encoder_output(model).to(model.get_base_model().dtype)
    return ForwardPlan(None, offsets, virtual[None].expand(batch, -1, -1))


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
    _refuse_unsupported_inputs(kwargs)
    base = model.get_base_model()
    if adapter_names is not None:
        return _named_forward(model, base, adapter_names, input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds, labels=labels, position_ids=position_ids, **kwargs)
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None:
        raise ValueError("pass input_ids or inputs_embeds")
    batch, length = tokens.shape[:2]
    plan = _plan(model, batch, tokens.device, serving=False)
    rule = compat.position_rule(base)
    positions = token_positions(attention_mask, position_ids, plan.offsets, length, rule)
    stores = _use_cache(base, kwargs)
    if plan.prefix is not None:
        if base.training and torch.is_grad_enabled():
            _check_checkpointing(base)
        if stores:
            kwargs[compat.cache_kwarg(base)] = PrefixCache(plan.prefix, store=True)
        return _run_with_prefix(base, base, plan.prefix, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                attention_mask=attention_mask, position_ids=positions, labels=labels, **kwargs)
    count = plan.virtual.shape[1]
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
        inputs_embeds=torch.cat([plan.virtual.to(inputs_embeds.dtype), inputs_embeds], dim=1),
        attention_mask=_prepend(attention_mask, count, 1),
        position_ids=torch.cat([virtual_positions, positions], dim=1),
        labels=labels,
        **kwargs,
    )


def _virtual_token_prefix(model: Any) -> PrefixKV:
    """P-tuning / prompt tuning at serve time: the virtual tokens run once (batch 1) through the frozen
    model, their per-layer K/V as a bank [L, 2, 1, Hkv, P, D].

    They come first in every row and attend only to each other (causal models), so their K/V are the same
    for all rows of any batch: PEFT recomputes (and caches) them once per row.
    """
    base = model.get_base_model()
    prompts = _prompt_encoder_output(model)[None].to(base.dtype)
    return PrefixKV(prompt_kv(base, inputs_embeds=prompts)[:, :, None])


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
    _refuse_unsupported_inputs(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    input_ids = kwargs.get("input_ids")
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise UnsupportedModelError("generate on a patched PEFT model takes input_ids (not inputs_embeds)")
    base = model.get_base_model()
    if adapter_names is not None:
        return _named_generate(model, base, base.generate, adapter_names, kwargs)
    with torch.no_grad():
        plan = _plan(model, input_ids.shape[0], input_ids.device, serving=True)
    return _generate_with_prefix(base, base.generate, plan.prefix, plan.offsets, kwargs)


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
    docstring). ``run`` is the callable that runs ``base`` (default ``base`` itself). P-tuning and prompt
    tuning rows read compiled soft prompts (causal models only), so outputs have the batch's own ``T``
    positions, never the virtual tokens'.
    """
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None:
        raise ValueError("pass input_ids or inputs_embeds")
    batch, length = tokens.shape[:2]
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
        kwargs[cache_name] = PrefixCache(served.prefix, store=True, count_prefix=False)
    return _run_with_prefix(base, run, served.prefix, **inputs, **kwargs)


def _named_generate(model: Any, base: Any, run: Any, adapter_names: list[str], kwargs: dict[str, Any]) -> Any:
    """``run(**kwargs)`` (a ``generate``) with row ``i`` served by the prefix named ``adapter_names[i]``.

    The rows' prefixes travel in a :class:`PrefixCache` that stores real tokens only; each row's positions
    start at its own prefix length and skip its own leading padding, and transformers extends them by one
    per step.
    """
    input_ids = kwargs.get("input_ids")
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise UnsupportedModelError("generate with adapter_names takes input_ids (not inputs_embeds)")
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        raise UnsupportedModelError("generate with adapter_names builds its own KV cache; pass no cache")
    config = kwargs.get("generation_config") or base.generation_config
    for name in ("num_beams", "num_return_sequences"):
        if (kwargs.get(name) or getattr(config, name, 1) or 1) > 1:
            raise UnsupportedModelError(
                f"generate with adapter_names runs one sequence per row; {name} > 1 would multiply the rows "
                "(repeat each row and its name in the batch instead)"
            )
    with torch.no_grad():
        served = adapter_registry(model).batch(adapter_names, input_ids.shape[0])
    return _generate_with_prefix(base, run, served.prefix, served.offsets, kwargs)


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


def _generate_with_prefix(
    base: Any, run: Any, prefix: PrefixKV | None, offsets: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    """``run(**kwargs)`` (a ``generate``) with each row numbered after its ``offsets`` [B] positions and
    ``prefix`` (if any) travelling in a cache that stores real tokens only."""
    input_ids = kwargs["input_ids"]
    kwargs["position_ids"] = token_positions(
        kwargs.get("attention_mask"), kwargs.get("position_ids"), offsets.to(input_ids.device),
        input_ids.shape[1], compat.position_rule(base),
    )
    # Positions are explicit, so the cache counts the stored tokens only: transformers releases that take
    # the prompt's uncached part from the cache length then feed the whole prompt on the first step.
    if prefix is not None:
        kwargs[compat.cache_kwarg(base)] = PrefixCache(prefix, store=True, count_prefix=False)
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

    ``model``: a ``peft.PeftModel`` whose active adapter is PREFIX_TUNING (with or without projection),
    P_TUNING (MLP or LSTM encoder) or PROMPT_TUNING, for any task type (causal LM, sequence or token
    classification); or a plain ``transformers`` ``PreTrainedModel``. Results equal the unpatched model's; see
    the module docstring. Either then serves named prefixes (``fastprompt.load_adapter``, ``cache_prompt``, a
    PeftModel's own adapters) per batch row through ``adapter_names=[...]`` in ``forward`` and ``generate``.

    A ``PeftModel``'s checkpoints also keep its prompt encoders (:func:`fastprompt.enable_encoder_checkpoints`),
    so the ``Trainer``'s ``load_best_model_at_end`` and ``resume_from_checkpoint`` restore what was saved.

    Raises :class:`~fastprompt.UnsupportedModelError` (saying why) for anything else: attention not
    dispatched through ``ALL_ATTENTION_FUNCTIONS``, sliding-window / chunked / soft-capped attention,
    encoder-decoder models, adapters of other types.
    """
    if model.__dict__.get(_STATE_ATTR) is not None:
        return model
    if compat.is_peft_model(model):
        _check_peft_model(model)
        prepare_encoders(model)
        base = model.get_base_model()
        state = _PatchState(base, base.config._attn_implementation, AdapterRegistry(model),
                            encoder_checkpoints=not checkpoints.encoder_checkpoints_enabled(model))
        checkpoints.enable_encoder_checkpoints(model)
        _set_attn_implementation(base, ATTN_IMPLEMENTATION)
        state.swaps.wrap(model, "forward", _patched_forward, keep_signature=True)
        if hasattr(model, "prepare_inputs_for_generation"):  # the task types PEFT lets generate
            state.swaps.wrap(model, "generate", _patched_generate, keep_signature=True)
    elif isinstance(model, PreTrainedModel):
        _check_transformers_model(model)
        base = model
        state = _PatchState(base, model.config._attn_implementation, AdapterRegistry(model))
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
    object.__setattr__(model, _STATE_ATTR, state)
    return model


def unpatch(model: Any) -> Any:
    """Undo :func:`patch` exactly (attention implementation, replaced methods, the encoder checkpoints it turned
    on; the prefixes registered for ``adapter_names`` are dropped with the patch); a no-op if not patched."""
    state: _PatchState | None = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return model
    state.swaps.restore()
    if state.encoder_checkpoints:
        checkpoints.disable_encoder_checkpoints(model)
    state.base.set_attn_implementation(state.attn_implementation)
    del model.__dict__[_STATE_ATTR]
    return model
