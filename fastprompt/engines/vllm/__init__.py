"""Serving fastprompt's prompt-learning adapters inside vLLM (imports vLLM; ``import fastprompt`` never does).

:class:`PromptAdapters` compiles every adapter kind (prefix tuning with or without projection, P-tuning v2,
P-tuning MLP/LSTM, prompt tuning), cached prompts and exported prefixes to per-layer K/V once and builds vLLM's
engine arguments and per-request inputs; :mod:`.connector` writes the K/V into vLLM's paged cache.
"""

from fastprompt.engines.vllm.adapters import BASE, PromptAdapters, compile_prefixes

__all__ = ["BASE", "PromptAdapters", "compile_prefixes"]
