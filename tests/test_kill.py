"""A process killed at the end of an epoch (SIGKILL, a power cut: no handler runs) must
leave a run that `train --resume` finishes with the bytes of a run never killed.

The end of an epoch writes three things: the epoch's network file, the resume state that
belongs to it, and the epoch's samples. Each test kills a real training process (`os._exit`,
which skips every handler, as SIGKILL does) right before one of them, resumes, and
compares every network file and sample with an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from engine_runs import DEMO, REPO, SHORT_RUN

from meebs.cli import main

pytestmark = pytest.mark.slow  # trains, and starts processes: `make test-fast` skips it

# 3 epochs of 10 steps (no class images, batch 6), samples after each
THREE_EPOCHS = [
    *SHORT_RUN,
    "train.epochs=3",
    "data.reg_dir=null",
    "train.batch_size=6",
    "validation.enabled=false",
]

# Run `train` in a process that dies (exit 137, no handler, no cleanup) on entering the
# Loop method named by argv[1] when its epoch is 2: the epoch file (`_save`), the
# state after epoch 2 (`_save_state`, position epoch 3) or the samples (`_samples`).
DRIVER = """
import os, sys
from meebs.training import loop

method = sys.argv[1]
original = getattr(loop.Loop, method)

def dies_at_epoch_two(self, *args):
    epoch = args[1] if method != "_save_state" else args[1].epoch - 1
    if epoch == 2 and (method != "_save_state" or args[1].batch == 0):
        os._exit(137)
    return original(self, *args)

setattr(loop.Loop, method, dies_at_epoch_two)
from meebs.cli import main
sys.exit(main(sys.argv[2:]))
"""


def outputs(run: Path) -> dict[str, str]:
    files = [*run.glob("*.safetensors"), *run.glob("samples/*.png")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert main(["train", DEMO, *THREE_EPOCHS, f"output.dir={out}"]) == 0
    (run,) = out.glob("meebs_demo/*")
    return outputs(run)


@pytest.mark.parametrize("method", ["_save", "_save_state", "_samples"])
def test_a_kill_at_the_end_of_an_epoch_resumes_to_the_same_bytes(
    method, whole, tmp_path, monkeypatch
):
    argv = ["train", DEMO, *THREE_EPOCHS, f"output.dir={tmp_path}"]
    killed = subprocess.run(
        [sys.executable, "-c", DRIVER, method, *argv], cwd=REPO, capture_output=True, text=True
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    (run,) = tmp_path.glob("meebs_demo/*")
    monkeypatch.chdir(REPO)
    assert main(["train", "--resume", str(run)]) == 0
    assert outputs(run) == whole
    assert not (run / "resume.state").exists()
