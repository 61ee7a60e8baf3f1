"""Methods replaced on one object instance, and putting back exactly what was there.

``patch`` and the encoder checkpoints both wrap a model's bound methods (``forward``, ``save_pretrained``, ...)
by setting an instance attribute that shadows the class's method. Undoing that must restore the instance's own
attribute where it had one and otherwise remove the shadow, so the class's method shows through again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["Swaps"]

_ABSENT = object()


class Swaps:
    """A record of replaced instance attributes, restored in reverse order by :meth:`restore`."""

    def __init__(self) -> None:
        self._replaced: list[tuple[Any, str, Any]] = []  # (owner, name, its own previous value or _ABSENT)

    def wrap(self, owner: Any, name: str, wrapper: Callable[..., Any], *, keep_signature: bool = False) -> None:
        """Set ``owner.name`` to ``wrapper(owner, original, *args, **kwargs)``, ``original`` being what
        ``owner.name`` was. ``keep_signature``: the replacement reports the original's signature (transformers'
        ``generate`` validates its kwargs against ``forward``'s)."""
        original = getattr(owner, name)
        self._replaced.append((owner, name, owner.__dict__.get(name, _ABSENT)))
        replacement = functools.partial(wrapper, owner, original)
        if keep_signature:
            replacement.__signature__ = inspect.signature(original)
        object.__setattr__(owner, name, replacement)

    def restore(self) -> None:
        """Put back every replaced attribute, last replaced first; the record is then empty."""
        while self._replaced:
            owner, name, previous = self._replaced.pop()
            if previous is _ABSENT:
                owner.__dict__.pop(name, None)
            else:
                object.__setattr__(owner, name, previous)
