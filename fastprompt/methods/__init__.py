"""The prompt-learning methods, one declared object each (see :class:`~fastprompt.methods.base.PromptMethod`).

=================  ====================  ==========  ========  =====================================
method             PEFT type             output      training  encoder
=================  ====================  ==========  ========  =====================================
``prefix_tuning``  PREFIX_TUNING         K/V         prefix    table, or table + projection MLP
                                                               (without it: P-tuning v2)
``p_tuning``       P_TUNING              embeddings  prepend   table + MLP, or table + LSTM + MLP
``prompt_tuning``  PROMPT_TUNING         embeddings  prepend   table
``cached_prompt``  (not a PEFT adapter)  tokens      frozen    the frozen model itself
=================  ====================  ==========  ========  =====================================

Adding a method is a module here and a line in :data:`METHODS`; :mod:`~fastprompt.methods.peft_format`
finds PEFT adapters of it by their ``peft_type``.
"""

from fastprompt.methods.base import AdapterFitError, ModelFit, Output, PromptMethod, Training, require_causal
from fastprompt.methods.cached_prompt import CachedPrompt
from fastprompt.methods.p_tuning import PTuning
from fastprompt.methods.prefix_tuning import PrefixTuning
from fastprompt.methods.prompt_tuning import PromptTuning

__all__ = [
    "CACHED_PROMPT",
    "METHODS",
    "AdapterFitError",
    "ModelFit",
    "Output",
    "PromptMethod",
    "Training",
    "method_named",
    "require_causal",
]

CACHED_PROMPT = CachedPrompt()
METHODS: tuple[PromptMethod, ...] = (PrefixTuning(), PTuning(), PromptTuning(), CACHED_PROMPT)


def method_named(name: str) -> PromptMethod:
    """The method whose :attr:`~PromptMethod.name` is ``name``."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"no prompt-learning method is named {name!r}; methods: {[m.name for m in METHODS]}")
