"""Writing a file so that it is either complete or absent, never half-written.

Every output goes to a hidden temp file in the target's folder, is fsynced, then renamed
over the target (atomic on POSIX). A full disk or a permission problem becomes one clear
`MeebsError` naming the file, and the temp file is removed, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from meebs.errors import MeebsError


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    path = Path(path)
    temp_name = None
    try:
        descriptor, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException as exc:
        if temp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise MeebsError(
                f"cannot write {path}: {reason}; free disk space or fix the folder's "
                "permissions, then rerun (nothing was half-written)"
            ) from None
        raise
    _fsync_directory(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, [text.encode("utf-8")])


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
