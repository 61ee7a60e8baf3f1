"""Integrations with serving engines: thin translations of fastprompt's per-layer prefix K/V into each engine's own
ways in. Nothing below this package knows an engine exists, and ``import fastprompt`` imports none of them."""
