"""Turn the core's user-fixable errors into short node errors.

ComfyUI shows an exception raised by a node together with its traceback. Errors the user can fix
(``fatezero_core.errors.FateZeroError``) are re-raised from the node itself, without the chain of
core frames, so the dialog shows the message and a traceback that ends in the node.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

from ..fatezero_core.errors import FateZeroError


class FateZeroNodeError(ValueError):
    """Bad input or settings on a FateZero node; the message says what to change."""


@contextmanager
def user_errors():
    """Re-raise ``FateZeroError`` inside the block as :class:`FateZeroNodeError`, chain dropped."""
    try:
        yield
    except FateZeroError as exc:
        raise FateZeroNodeError(str(exc)) from None


def reports_user_errors(execute):
    """Decorator every node puts on its whole ``execute``: :func:`user_errors` around it."""

    @functools.wraps(execute)
    def wrapper(*args, **kwargs):
        with user_errors():
            return execute(*args, **kwargs)

    return wrapper


__all__ = ["FateZeroNodeError", "reports_user_errors", "user_errors"]
