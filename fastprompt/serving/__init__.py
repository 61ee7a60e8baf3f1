"""Serving several prefixes from one frozen model.

- :func:`load_adapter`: register a prompt-learning adapter saved in PEFT's format (any of its types) by name;
- :func:`cache_prompt`: a fixed prompt run once, its K/V registered as a named read-only prefix;
- :func:`export_prefix_kv` / :func:`load_prefix_kv`: any registered prefix out as an
  :class:`~fastprompt.prefix.ExportedPrefix` (safetensors), and back onto a model of the same geometry;

They fill the model's adapter registry (:func:`fastprompt.hf.registry.adapter_registry`), which turns one name
per batch row into the forward's prefix bank and each row's positions.
"""

from fastprompt.serving.api import cache_prompt, export_prefix_kv, load_adapter, load_prefix_kv

__all__ = [
    "cache_prompt",
    "export_prefix_kv",
    "load_adapter",
    "load_prefix_kv",
]
