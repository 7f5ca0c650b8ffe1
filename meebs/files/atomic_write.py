"""Writing a file so that it is either complete or absent, never half-written.

Every output goes to a hidden temp file in the target's folder (`.NAME.RANDOM.tmp`, a
name no other writer can pick), is fsynced, then renamed over the target (atomic on
POSIX), and the folder is fsynced so the rename itself survives a power cut; a folder
made for outputs is fsynced into its parent too. A full disk or a permission problem
becomes one clear `MeebsError` naming the file, and the temp file is removed, also on
Ctrl-C. Only a process killed mid-write (SIGKILL, a power cut) leaves its temp file
behind: never read as an output, and removed by `remove_temps`.

`tempfile` creates files 0600 and folders 0700 (it cannot know they will be renamed into
place); every output is opened up to what the user's umask allows, like any other tool's
(0644 / 0755 with the usual umask 022), so a shared outputs/ stays readable.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from meebs.errors import MeebsError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. POSIX reads it only by setting it: for that instant it is the
    strictest 0o077, so a file another thread creates meanwhile is never more open than
    intended, and the lock keeps two readers from restoring each other's stand-in."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary `open(path, "w")` would give a new file."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode `mkdir` would give a new folder."""
    return 0o777 & ~current_umask()


def make_folder(path: Path, fix: str = "fix the permissions of the folder above it") -> None:
    """`mkdir -p path`, each new folder fsynced into its parent (a file fsynced into a
    folder that a power cut then loses would be lost with it); a permission problem or
    a full disk is one line naming the folder and `fix`."""
    path = Path(path)
    missing = list(itertools.takewhile(lambda f: not f.is_dir(), (path, *path.parents)))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise folder_error(str(path), exc, fix) from None
    for folder in reversed(missing):
        sync_folder(folder.parent)


def make_temp_folder(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new private folder in `parent` to build an output in before renaming it into
    place; its mode follows the umask like `mkdir`'s."""
    try:
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
        os.chmod(folder, folder_mode())
    except OSError as exc:
        raise folder_error(f"a folder in {parent}", exc, "fix its permissions") from None
    return folder


def folder_error(what: str, exc: OSError, fix: str) -> MeebsError:
    """The one-line error for a folder that cannot be created: `what` names it."""
    reason = exc.strerror or str(exc)
    return MeebsError(f"cannot create {what}: {reason}; free disk space or {fix}, then rerun")


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """`path` holds `chunks` once this returns, durably; before, it holds what it held."""
    path = Path(path)
    temp_name = None
    try:
        descriptor, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), file_mode())
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
    sync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, [text.encode("utf-8")])


def remove_temps(folder: Path, older_than_s: float | None = None) -> int:
    """Remove the temp files of writes killed midway in `folder`; returns how many.
    `older_than_s` spares younger ones, which a live process may still be writing (in a
    folder several processes write, like the latent cache)."""
    removed, now = 0, time.time()
    for temp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not a file
            if older_than_s is None or now - temp.stat().st_mtime > older_than_s:
                temp.unlink()
                removed += 1
    return removed


def sync_folder(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (POSIX); a no-op where folders
    cannot be opened."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
