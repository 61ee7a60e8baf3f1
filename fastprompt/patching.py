"""``fastprompt.patch(model)`` / ``fastprompt.unpatch(model)``: one line that puts a model on the fast path.

A plain ``transformers`` model gets the ``"fastprompt"`` attention implementation (its prefixes then come
from the serving APIs through the ``fastprompt_prefix`` forward kwarg). A ``peft.PeftModel`` whose active
adapter is prompt learning additionally has three of its methods replaced on the instance:

- ``forward``: for prefix tuning, runs the prefix encoder once (batch 1) and passes the per-layer blocks
  down as ``fastprompt_prefix``, with a :class:`~fastprompt.integration.PrefixCache` in place of PEFT's
  per-row cache;
- ``get_prompt``: returns that cache for prefix tuning, and for P-tuning / prompt tuning the encoder's
  output computed once and expanded to the batch as a view (PEFT runs and copies it per row);
- ``prepare_inputs_for_generation``: hands the prefix of the generation's cache to every decoding step;
  for P-tuning / prompt tuning it first runs the virtual tokens once (batch 1) through the frozen model
  and serves their per-layer K/V as the prefix block, instead of prepending them to every row.

Everything else (masks widened by PEFT, labels, classification heads, position handling) stays PEFT's own
code, so results are PEFT's. ``unpatch`` puts back exactly what was there.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from fastprompt.encoders import encode_prompt
from fastprompt.errors import UnsupportedModelError
from fastprompt.integration import ATTN_IMPLEMENTATION, PREFIX_KWARG, PrefixCache, PrefixKV

__all__ = ["patch", "unpatch"]

_STATE_ATTR = "_fastprompt_patch_state"
_ABSENT = object()
_PREFIX_TYPES = ("PREFIX_TUNING",)
_EMBEDDING_TYPES = ("P_TUNING", "PROMPT_TUNING")

# Hands the cache made by the patched forward to the patched get_prompt that PEFT's forward calls
# inside it; a ContextVar is per thread and per task, so concurrent forwards never share it.
_FORWARD_CACHE: contextvars.ContextVar[PrefixCache | None] = contextvars.ContextVar(
    "fastprompt_forward_cache", default=None
)


@dataclass
class _PatchState:
    attn_implementation: str
    replaced: dict[str, Any] = field(default_factory=dict)  # instance attribute -> previous value or _ABSENT


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def _peft_type(peft_config: Any) -> str:
    peft_type = peft_config.peft_type
    return getattr(peft_type, "value", peft_type)


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
    peft_type = _peft_type(peft_config)
    if peft_type not in _PREFIX_TYPES + _EMBEDDING_TYPES:
        raise UnsupportedModelError(
            f"the active adapter {model.active_adapter!r} is {peft_type}; fastprompt accelerates "
            "PREFIX_TUNING, P_TUNING and PROMPT_TUNING adapters"
        )
    if (peft_config.num_transformer_submodules or 1) != 1:
        raise UnsupportedModelError("prompt learning on encoder-decoder models is not supported")
    _check_transformers_model(model.get_base_model())
    if peft_type in _PREFIX_TYPES:
        layers, kv_heads, head_dim = _kv_geometry(model.get_base_model().config)
        want = (peft_config.num_layers, peft_config.num_attention_heads,
                peft_config.token_dim // peft_config.num_attention_heads)
        if want != (layers, kv_heads, head_dim):
            raise UnsupportedModelError(
                f"the prefix adapter provides (layers, kv heads, head size) = {want} but the model's attention "
                f"uses {(layers, kv_heads, head_dim)}"
            )


def _prompt_encoder_output(model: Any) -> torch.Tensor:
    """What PEFT's encoder yields for one batch row, computed once: [P, out_dim]."""
    encoder = model.prompt_encoder[model.active_adapter]
    # PEFT keeps the tokens on the CPU; encode_prompt checks them there and keeps one device copy
    tokens = model.prompt_tokens[model.active_adapter][: model.active_peft_config.num_virtual_tokens]
    return encode_prompt(encoder, tokens)


def prefix_from_peft(model: Any) -> PrefixKV:
    """The active prefix-tuning adapter's per-layer K/V as one bank [L, 2, 1, Hkv, P, D] (a view).

    Runs the prefix encoder (embedding, and the projection MLP when the adapter has one) once.
    """
    peft_config = model.active_peft_config
    flat = _prompt_encoder_output(model)
    if model.base_model_torch_dtype is not None:
        flat = flat.to(model.base_model_torch_dtype)
    heads = peft_config.num_attention_heads
    shape = (peft_config.num_virtual_tokens, peft_config.num_layers, 2, heads, peft_config.token_dim // heads)
    # PEFT lays the encoder output out as [P, (layer, k|v), head, dim]; permuting gives the bank.
    return PrefixKV(flat.view(shape).permute(1, 2, 3, 0, 4).unsqueeze(2))


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


def _refuse_mixed_adapters(kwargs: dict[str, Any]) -> None:
    if kwargs.get("adapter_names") is not None:
        raise UnsupportedModelError(
            "mixed-adapter batches (adapter_names=...) are not supported by fastprompt.patch yet: the batch would "
            "silently run the active adapter on every row; run one adapter per batch (or fastprompt.unpatch)"
        )


def _stores_cache(model: Any, use_cache: bool | None) -> bool:
    """Whether the base model would fill a KV cache in this forward, as transformers decides it."""
    if use_cache is not None:
        return use_cache
    base = model.get_base_model()
    # A training forward's cache is never read; not storing it saves a copy of every layer's K and V.
    return bool(getattr(base.config, "use_cache", False)) and not base.training


def _patched_forward(model: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
    _refuse_mixed_adapters(kwargs)
    if _peft_type(model.active_peft_config) not in _PREFIX_TYPES:
        return original(*args, **kwargs)
    if model.training and torch.is_grad_enabled():
        _check_checkpointing(model)
    prefix = prefix_from_peft(model)
    token = _FORWARD_CACHE.set(PrefixCache(prefix, store=_stores_cache(model, kwargs.get("use_cache"))))
    try:
        output = original(*args, **kwargs, **{PREFIX_KWARG: prefix})
    finally:
        _FORWARD_CACHE.reset(token)
    missing = set(range(prefix.bank.shape[0])) - prefix.layers_used
    if missing:
        raise UnsupportedModelError(
            f"{type(model.get_base_model()).__name__} did not hand the prefix to the attention of layers "
            f"{sorted(missing)} (its layers do not pass forward keyword arguments down to attention), so this "
            "forward would have run without the prefix there"
        )
    return output


def _patched_get_prompt(
    model: Any,
    original: Any,
    batch_size: int,
    task_ids: torch.Tensor | None = None,
    max_cache_len: int | None = None,
) -> Any:
    peft_type = _peft_type(model.active_peft_config)
    if peft_type in _PREFIX_TYPES:
        cache = _FORWARD_CACHE.get()
        # Outside the patched forward (generate's first step), the cache starts the generation.
        return cache if cache is not None else PrefixCache(prefix_from_peft(model), store=True)
    if peft_type in _EMBEDDING_TYPES:
        return _prompt_encoder_output(model).unsqueeze(0).expand(batch_size, -1, -1)
    return original(batch_size, task_ids=task_ids, max_cache_len=max_cache_len)


def _virtual_token_prefix(model: Any) -> PrefixKV:
    """P-tuning / prompt tuning at serve time: the virtual tokens run once (batch 1) through the frozen
    model, their per-layer K/V as a bank [L, 2, 1, Hkv, P, D].

    They come first in every row and attend only to each other, so their K/V are the same for all rows
    of any batch: PEFT recomputes (and caches) them once per row.
    """
    base = model.get_base_model()
    prompts = _prompt_encoder_output(model)[None].to(base.dtype)
    cache = DynamicCache()
    base.base_model(inputs_embeds=prompts, past_key_values=cache, use_cache=True)  # the backbone, no LM head
    return PrefixKV(torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers]))


def _patched_prepare_inputs(model: Any, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    cache = kwargs.get("past_key_values")
    starts_cached_generation = cache is not None and (isinstance(cache, PrefixCache) or cache.get_seq_length() == 0)
    if starts_cached_generation and _peft_type(model.active_peft_config) in _EMBEDDING_TYPES:
        model_inputs = model.base_model_prepare_inputs_for_generation(*args, **kwargs)
        if not isinstance(model_inputs["past_key_values"], PrefixCache):
            model_inputs["past_key_values"] = PrefixCache(_virtual_token_prefix(model), store=True)
        # PEFT drops position ids for these methods: the model numbers tokens after the virtual ones.
        model_inputs["position_ids"] = None
    else:
        model_inputs = original(*args, **kwargs)
    cache = model_inputs.get("past_key_values")
    if isinstance(cache, PrefixCache):
        model_inputs[PREFIX_KWARG] = cache.prefix
    return model_inputs


def _replace(model: Any, state: _PatchState, name: str, wrapper: Any) -> None:
    state.replaced[name] = model.__dict__.get(name, _ABSENT)
    original = getattr(model, name)
    object.__setattr__(model, name, functools.partial(wrapper, model, original))


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
    classification); or a plain ``transformers`` ``PreTrainedModel`` (prefixes then come through the
    ``fastprompt_prefix`` forward kwarg). Results equal the unpatched model's; see the module docstring.

    Raises :class:`~fastprompt.UnsupportedModelError` (saying why) for anything else: attention not
    dispatched through ``ALL_ATTENTION_FUNCTIONS``, sliding-window / chunked / soft-capped attention,
    encoder-decoder models, adapters of other types.
    """
    if model.__dict__.get(_STATE_ATTR) is not None:
        return model
    peft_model_class = _peft_model_class()
    if peft_model_class is not None and isinstance(model, peft_model_class):
        _check_peft_model(model)
        base = model.get_base_model()
        state = _PatchState(attn_implementation=base.config._attn_implementation)
        _set_attn_implementation(base, ATTN_IMPLEMENTATION)
        _replace(model, state, "forward", _patched_forward)
        _replace(model, state, "get_prompt", _patched_get_prompt)
        if hasattr(model, "prepare_inputs_for_generation"):
            _replace(model, state, "prepare_inputs_for_generation", _patched_prepare_inputs)
    elif isinstance(model, PreTrainedModel):
        _check_transformers_model(model)
        state = _PatchState(attn_implementation=model.config._attn_implementation)
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    else:
        raise UnsupportedModelError(
            f"fastprompt.patch takes a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}"
        )
    object.__setattr__(model, _STATE_ATTR, state)
    return model


def unpatch(model: Any) -> Any:
    """Undo :func:`patch` exactly (attention implementation and replaced methods); a no-op if not patched."""
    state: _PatchState | None = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return model
    for name, previous in state.replaced.items():
        if previous is _ABSENT:
            model.__dict__.pop(name, None)
        else:
            object.__setattr__(model, name, previous)
    base = model.get_base_model() if state.replaced else model
    base.set_attn_implementation(state.attn_implementation)
    del model.__dict__[_STATE_ATTR]
    return model
