"""The hash cache: an unchanged file is read once; any change hashes it again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from meebs.files import hash_cache
from meebs.files.hash_cache import cache_file, cached_sha256


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MEEBS_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the cache actually reads, in order."""
    calls: list[Path] = []
    real = hash_cache.hash_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(hash_cache, "hash_file", counting)
    return calls


def _blob(folder: Path, data: bytes = b"meeb" * 1000) -> Path:
    file = folder / "model.safetensors"
    file.write_bytes(data)
    return file


def test_second_call_reads_nothing(tmp_path: Path, cache_dir: Path, hashed: list[Path]) -> None:
    file = _blob(tmp_path)
    expected = hashlib.sha256(file.read_bytes()).hexdigest()
    assert cached_sha256(file) == expected
    assert cached_sha256(file) == expected
    assert cached_sha256(tmp_path / "." / file.name) == expected  # same resolved path
    assert hashed == [file.resolve()]
    stored = json.loads((cache_dir / "hashes.json").read_text())
    entry = stored["files"][str(file.resolve())]
    assert entry["sha256"] == expected and entry["size"] == file.stat().st_size
    assert entry["mtime_ns"] == file.stat().st_mtime_ns


def test_touch_or_new_size_hashes_again(
    tmp_path: Path, cache_dir: Path, hashed: list[Path]
) -> None:
    file = _blob(tmp_path)
    first = cached_sha256(file)
    # Same bytes, new mtime: hashed again, same digest.
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cached_sha256(file) == first
    assert len(hashed) == 2
    # New size (same mtime forced back): hashed again, new digest.
    mtime = file.stat().st_mtime_ns
    with file.open("ab") as stream:
        stream.write(b"!")
    os.utime(file, ns=(mtime, mtime))
    assert cached_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest() != first
    assert len(hashed) == 3
    assert cached_sha256(file) != first and len(hashed) == 3


def test_corrupt_cache_is_ignored_and_rewritten(
    tmp_path: Path, cache_dir: Path, hashed: list[Path]
) -> None:
    file = _blob(tmp_path)
    cache_dir.mkdir()
    for garbage in ("{not json", "[1, 2]", '{"version": 1, "files": {"x": 3}}', ""):
        (cache_dir / "hashes.json").write_text(garbage)
        assert cached_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert len(hashed) == 4
    json.loads((cache_dir / "hashes.json").read_text())  # valid again
    cached_sha256(file)
    assert len(hashed) == 4


def test_wrong_cached_entry_of_another_identity_is_not_trusted(
    tmp_path: Path, cache_dir: Path, hashed: list[Path]
) -> None:
    file = _blob(tmp_path)
    cached_sha256(file)
    stored = json.loads((cache_dir / "hashes.json").read_text())
    stored["files"][str(file.resolve())]["size"] += 1
    (cache_dir / "hashes.json").write_text(json.dumps(stored))
    assert cached_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    assert len(hashed) == 2


def test_unwritable_cache_still_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MEEBS_CACHE_DIR", str(blocker / "cache"))
    file = _blob(tmp_path)
    assert cached_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()


def test_entries_of_deleted_files_are_dropped(tmp_path: Path, cache_dir: Path) -> None:
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"1")
    cached_sha256(gone)
    gone.unlink()
    cached_sha256(_blob(tmp_path))
    files = json.loads((cache_dir / "hashes.json").read_text())["files"]
    assert list(files) == [str((tmp_path / "model.safetensors").resolve())]


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEEBS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file() == tmp_path / "xdg" / "sd-meebs" / "hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_file() == tmp_path / "home" / ".cache" / "sd-meebs" / "hashes.json"
    monkeypatch.setenv("MEEBS_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_file() == tmp_path / "mine" / "hashes.json"
