"""The one exception type a user ever sees.

Every module raises `MeebsError` (or a subclass) for problems the user can fix: a wrong
recipe key, a corrupt image, a hash mismatch. The CLI prints its message on one line and
exits with status 2, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MeebsError(Exception):
    """A problem with the user's input, explained in one line with the fix."""


class RecipeError(MeebsError):
    """A recipe key is unknown, mistyped, out of range or contradicts another key."""


class DataError(MeebsError):
    """The training or regularization folders or one of their files cannot be used."""


class ModelError(MeebsError):
    """The base model is missing, unsafe, not SD 1.x or not the pinned file."""


class TrainingDiverged(MeebsError):
    """The loss or the weights became NaN or inf: nothing more is trained or written."""


def quoted(value: object, limit: int = 80) -> str:
    """`value` as it may appear inside a one-line message: repr'd, so a newline or a
    control character in a stranger's file shows as `\\n` instead of breaking the line,
    and cut to `limit` characters, so a megabyte of junk is not echoed back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"
