"""The property every fuzzed parser must keep: a result, or one clear line."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from meebs.errors import MeebsError

T = TypeVar("T")

# A message echoes a file name or a key at most; a longer one is echoing the input.
MAX_MESSAGE = 1000


def result_or_one_line(call: Callable[..., T], *args, **kwargs) -> T | MeebsError:
    """Call `call`; return its result or the `MeebsError` it raised, after checking that
    the message is one non-empty line of at most MAX_MESSAGE characters. Any other
    exception propagates, and hypothesis reports it with the input that caused it."""
    try:
        return call(*args, **kwargs)
    except MeebsError as error:
        message = str(error)
        assert message.strip(), f"{type(error).__name__} with an empty message"
        assert "\n" not in message and "\r" not in message, f"message of several lines: {message!r}"
        assert len(message) <= MAX_MESSAGE, (
            f"message of {len(message)} characters: {message[:200]!r}..."
        )
        return error
