"""Exceptions of fastprompt."""


class UnsupportedModelError(TypeError):
    """A model that fastprompt cannot accelerate; the message says why. Never a silent slow path."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (``FASTPROMPT_BACKEND`` or ``backend=``) that cannot run these tensors here."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when the message is empty: an error in one line."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__
