"""`pip install .` gives a working `meebs` command (pyproject.toml: [build-system],
[project], [project.scripts]). Builds the wheel, installs it into a scratch venv and runs
the installed `meebs`. Offline: nothing is downloaded.

- The wheel is built from a copy of what the build reads (pyproject.toml, README.md,
  meebs/) because setuptools writes build/ and sd_meebs.egg-info/ next to the sources.
- `--no-build-isolation`: the build uses this interpreter's setuptools (in the locks, a
  dependency of torch) instead of downloading one into an isolated build environment.
- The scratch venv sees the runtime dependencies without installing them: a venv made by
  `python -m venv` starts from the base interpreter, so it sees neither .venv's packages
  nor, with --system-site-packages, anything but the base interpreter's own. A .pth file in
  its site-packages appends this interpreter's site-packages to its sys.path instead. That
  path comes after the venv's own site-packages, so the venv imports the installed meebs.
  (Lines of a .pth file only add folders: the .pth files inside the added folder, such as
  an editable install of the checkout, are not run.)
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_locks import in_pins, norm

import meebs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "meebs")


def run(command: list[str | Path], cwd: Path, timeout: int = 300) -> str:
    """Run `command`, return its stdout; fail with its output if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{command} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout, built offline from a copy of its sources."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = root / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*pip_wheel, "--no-index", "--wheel-dir", dist, source], cwd=root)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel) -> Path:
    """A scratch venv with the wheel installed (--no-deps) and this interpreter's packages
    visible through a .pth file (module docstring)."""
    venv = wheel.parent.parent / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv)
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(purelib.strip()) / "meebs_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    # pip itself comes through the .pth file; it installs into the venv (sys.prefix).
    # --ignore-installed: a meebs installed where the .pth points is not uninstalled.
    pip_install = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    run([*pip_install, wheel], cwd=venv.parent)
    return venv


def test_wheel_holds_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    checkout = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "meebs").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert checkout - names == set(), "files of meebs/ missing from the wheel"
    # the data files the code reads next to itself, by kind
    for name in (
        "meebs/assets/bpe_simple_vocab_16e6.txt.gz",
        "meebs/assets/tiny-trained/unet/diffusion_pytorch_model.safetensors",
        "meebs/assets/tiny-trained/unet/config.json",
        "meebs/assets/tiny-trained/MODEL_CARD.md",
        "meebs/configs/sd15/unet/config.json",
        "meebs/configs/README.md",
        "meebs/training/__init__.py",
    ):
        assert name in names
    assert not [name for name in names if name.startswith(("tests/", "build/"))]


def test_wheel_metadata_matches_the_requirements(wheel):
    zipped = zipfile.ZipFile(wheel)
    (metadata_name,) = [n for n in zipped.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(zipped.read(metadata_name))
    assert metadata["Name"] == "sd-meebs"
    assert metadata["Version"] == meebs.__version__
    assert wheel.name == f"sd_meebs-{meebs.__version__}-py3-none-any.whl"
    requires = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
    declared = {norm(r.name): r for r in requires}
    assert not [r for r in requires if r.marker or r.extras], "no markers or extras expected"

    cpu, cuda = in_pins("cpu"), in_pins("cuda")
    shared = {name for name in cpu.keys() & cuda.keys() if name != "torch"}
    assert {name: str(declared[name].specifier) for name in declared if name != "torch"} == {
        name: f"=={cpu[name]}" for name in shared if cpu[name] == cuda[name]
    }, "the wheel's pins differ from those cpu.in and cuda.in share"
    # torch: one range that both builds satisfy (2.13.0+cpu and 2.10.0 today)
    torch = declared["torch"].specifier
    for version in (cpu["torch"], cuda["torch"]):
        assert torch.contains(version), f"torch {version} does not satisfy {torch}"


def test_installed_meebs_imports_the_installed_copy(venv, tmp_path):
    # From an empty folder, so the checkout is not on sys.path through the current folder.
    printed = run([venv / "bin" / "python", "-c", "import meebs; print(meebs.__file__)"], tmp_path)
    assert Path(printed.strip()).resolve().is_relative_to(venv.resolve())


def test_meebs_help_lists_the_commands(venv):
    out = run([venv / "bin" / "meebs", "--help"], cwd=REPO)
    assert out.startswith("usage: ")  # the parser's prog is "entrypoint.py" (meebs.cli)
    for command in ("plan", "train", "fetch-model", "generate", "verdict"):
        assert command in out


def test_meebs_plan_runs_from_a_checkout(venv):
    # A console script puts its own bin/ first on sys.path, not the current folder: the
    # recipe and data come from the checkout, the code from the venv.
    out = run([venv / "bin" / "meebs", "plan", "recipes/demo.yaml"], cwd=REPO)
    assert "total steps" in out
    assert "meebs_demo.safetensors" in out


# What an installed meebs needs beside its code: the model pins (shipped in meebs/configs/)
# and, for `train --gpus N`, a command accelerate can start (`python -m meebs`).


def test_installed_meebs_reads_the_model_pins(venv, tmp_path):
    code = "from meebs.models.fetch import read_pins; print(sorted(read_pins()))"
    assert "sd15" in run([venv / "bin" / "python", "-c", code], tmp_path)


def test_installed_meebs_launches_an_existing_script(venv, tmp_path):
    code = "import json; from meebs.training.launch import launch_command as c; "
    code += "print(json.dumps(c(2, ['r.yaml'])))"
    command = json.loads(run([venv / "bin" / "python", "-c", code], tmp_path))
    scripts = [Path(part) for part in command[1:] if part.endswith(".py")]
    assert all(script.is_file() for script in scripts), scripts
    if "--module" in command:  # accelerate runs `python -m MODULE train ...`
        module = command[command.index("--module") + 1]
        assert "usage: " in run([venv / "bin" / "python", "-m", module, "--help"], tmp_path)
