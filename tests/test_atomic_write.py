"""Outputs are complete or absent: a full disk is a clear error and leaves nothing behind."""

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from meebs.errors import MeebsError
from meebs.files.atomic_write import make_temp_folder, write_atomic, write_text_atomic
from meebs.recipe.loading import load_recipe
from meebs.runs.folders import new_run_dir

REPO = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "file", "folder"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask_like_any_other_tool(tmp_path, umask, mask, file, folder):
    """tempfile makes 0600 files and 0700 folders; renamed into place they would stay so."""
    umask(mask)
    write_atomic(tmp_path / "net.safetensors", [b"x"])
    made = make_temp_folder(tmp_path, prefix=".new.")
    assert stat.S_IMODE((tmp_path / "net.safetensors").stat().st_mode) == file
    assert stat.S_IMODE(made.stat().st_mode) == folder
    assert os.umask(mask) == mask, "the umask is left as it was"


def refuse_mkdir(monkeypatch, inside: Path, code: int = errno.EACCES) -> None:
    """Path.mkdir fails for folders in `inside`, as for a user without write permission
    (tests run as root, where chmod 0o500 stops nothing)."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == inside:
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def demo_recipe(output_dir: Path):
    return load_recipe(REPO / "recipes" / "demo.yaml", [f"output.dir={output_dir}"])


def test_a_run_folder_that_cannot_be_created_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    recipe = demo_recipe(tmp_path)
    named = tmp_path / recipe.output.name
    named.mkdir()
    refuse_mkdir(monkeypatch, named)
    with pytest.raises(MeebsError) as info:
        new_run_dir(recipe)
    message = str(info.value)
    assert message.startswith(f"cannot create a run folder in {named}: Permission denied; ")
    assert "output.dir" in message and "\n" not in message


def test_a_full_disk_for_the_outputs_folder_is_one_line(tmp_path, monkeypatch):
    recipe = demo_recipe(tmp_path / "outputs")
    refuse_mkdir(monkeypatch, tmp_path / "outputs", errno.ENOSPC)
    with pytest.raises(MeebsError, match=r"^cannot create .*outputs/meebs_demo: No space left"):
        new_run_dir(recipe)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_outputs_folder_is_one_line(tmp_path):
    recipe = demo_recipe(tmp_path)
    named = tmp_path / recipe.output.name
    named.mkdir()
    named.chmod(0o500)
    try:
        with pytest.raises(MeebsError, match=r"cannot create a run folder in .*Permission"):
            new_run_dir(recipe)
    finally:
        named.chmod(0o700)


def test_a_temp_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(MeebsError, match=rf"^cannot create a folder in {tmp_path}: Permission"):
        make_temp_folder(tmp_path, prefix=".x.")
