"""sha256 of big files, remembered between runs so a 4 GB base model is read once.

`cached_sha256(path)` hashes a file the first time and records the digest in a small JSON
file, keyed by the file's resolved path and checked against its size, mtime_ns and inode.
While none of those change the recorded digest is returned without reading the file; any
change (a rewrite, `touch`, a replacement by rename) hashes it again.

The cache lives in `$MEEBS_CACHE_DIR/hashes.json` when that variable is set, else in
`${XDG_CACHE_HOME:-~/.cache}/sd-meebs/hashes.json`. It is only an accelerator: a missing,
unreadable or corrupt cache is ignored and rewritten, and a cache that cannot be written
(read-only home, full disk) just means the next run hashes again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from meebs.errors import MeebsError
from meebs.files.atomic_write import make_folder, write_text_atomic

CACHE_DIR_ENV = "MEEBS_CACHE_DIR"
CACHE_NAME = "hashes.json"
_VERSION = 1
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


def cache_file() -> Path:
    """Where the hash cache is, from the environment at call time."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser() / CACHE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "sd-meebs" / CACHE_NAME


def hash_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks so a 4 GB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of `path`, read from the cache when the file is unchanged since it was hashed.

    A file that changes while it is being hashed gets its digest returned but not recorded.
    """
    path = Path(path).resolve()
    before = _identity(path)
    key = str(path)
    entries = _read_entries(cache_file())
    entry = entries.get(key)
    if entry is not None and _same(entry, before):
        return str(entry["sha256"])
    digest = hash_file(path)
    if _identity(path) == before:
        _record(key, {**before, "sha256": digest})
    return digest


def _identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _same(entry: dict[str, Any], identity: dict[str, int]) -> bool:
    return all(entry.get(name) == value for name, value in identity.items())


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    digest = entry.get("sha256")
    numbers_ok = all(
        isinstance(entry.get(name), int) and not isinstance(entry.get(name), bool)
        for name in ("size", "mtime_ns", "inode")
    )
    return numbers_ok and isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX


def _read_entries(file: Path) -> dict[str, dict[str, Any]]:
    """The valid entries of the cache; anything unreadable or malformed counts as absent."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {key: entry for key, entry in files.items() if _valid_entry(entry)}


def _record(key: str, entry: dict[str, Any]) -> None:
    """Add one entry, drop entries of files that are gone, write the cache atomically.

    Re-reads the cache just before writing so entries other processes added meanwhile
    survive (two writers at the same instant can still lose one entry: it is re-hashed).
    """
    file = cache_file()
    entries = _read_entries(file)
    entries[key] = entry
    entries = {name: value for name, value in entries.items() if _exists(name)}
    text = json.dumps({"version": _VERSION, "files": entries}, indent=1, sort_keys=True)
    with contextlib.suppress(OSError, MeebsError):
        make_folder(file.parent)
        write_text_atomic(file, text + "\n")


def _exists(name: str) -> bool:
    try:
        return Path(name).is_file()
    except OSError:
        return False
