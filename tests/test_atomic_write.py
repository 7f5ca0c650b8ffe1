"""Outputs are complete or absent: a full disk is a clear error and leaves nothing behind."""

import errno
import os

import pytest

from meebs.atomic_write import write_atomic, write_text_atomic
from meebs.errors import MeebsError


def test_writes_the_whole_file(tmp_path):
    write_atomic(tmp_path / "a.bin", [b"ab", memoryview(b"cd")])
    write_text_atomic(tmp_path / "b.txt", "héllo")
    assert (tmp_path / "a.bin").read_bytes() == b"abcd"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"


def test_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "net.safetensors"
    target.write_bytes(b"previous")

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(MeebsError, match=r"cannot write .*net.safetensors: No space left"):
        write_atomic(target, [b"new"])
    assert target.read_bytes() == b"previous", "the old file is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]


def test_ctrl_c_while_writing_removes_the_temp_file(tmp_path):
    def chunks():
        yield b"half"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x.bin", chunks())
    assert list(tmp_path.iterdir()) == []
