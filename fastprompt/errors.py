"""Exceptions of fastprompt."""


class UnsupportedModelError(TypeError):
    """A model that fastprompt cannot accelerate; the message says why. Never a silent slow path."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (``FASTPROMPT_BACKEND`` or ``backend=``) that cannot run these tensors here."""
