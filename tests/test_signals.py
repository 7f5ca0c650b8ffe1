"""Stops from outside: SIGTERM (docker stop, Kubernetes, Slurm, systemd) to a real
training process, a second signal, and Ctrl-C while latents are cached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_runs import SHORT_RUN
from safetensors import safe_open

from meebs.cli import main
from meebs.data import latents as latent_io
from meebs.training import perf

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
# long enough never to finish on its own; one file at the end, so nothing is saved before it
ENDLESS = [
    "model.builtin=tiny",
    "train.epochs=500",
    "output.save_every_n_epochs=1000",
    "data.cache_latents=false",
    "sample.every_n_epochs=0",
    "validation.enabled=false",
]


def start_training(out: Path) -> tuple[subprocess.Popen, Path]:
    """`entrypoint.py train` in its own process; returns it once its loop is running."""
    process = subprocess.Popen(
        [
            sys.executable,
            "entrypoint.py",
            "train",
            "recipes/demo.yaml",
            *ENDLESS,
            f"output.dir={out}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "80"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        manifests = list(out.glob("meebs_demo/*/manifest.json"))
        if manifests and json.loads(manifests[0].read_text() or "{}").get("status") == "running":
            time.sleep(2)  # into the steps (the loop starts right after `running`)
            return process, manifests[0].parent
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"training did not start: {process.communicate()}")


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    process, run = start_training(tmp_path)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    manifest = json.loads((run / "manifest.json").read_text())
    step = manifest["steps"]
    assert manifest["status"] == "interrupted" and step > 0
    saved = run / f"meebs_demo-step{step:08d}.safetensors"
    with safe_open(saved, "pt") as f:
        assert len(list(f.keys())) > 0
    assert (run / "resume.state").is_file()
    # one unbroken line, whatever the width of a terminal that is not there
    expected = (
        f"stopped (SIGTERM): saved step {step} to {saved}; continue with: train --resume {run}"
    )
    assert expected in out.splitlines()
    assert "Traceback" not in err


def test_a_second_signal_stops_at_once_and_leaves_no_half_run(tmp_path, monkeypatch, capsys):
    """Two real signals inside one step (in this process: two signals sent to another
    process within microseconds merge into one). Nothing was saved yet, so no folder."""
    original = perf.PerfMeter.step_done

    def two_signals_in_step_three(self, sync=True):
        if self.steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the first: finish the step, then stop
            os.kill(os.getpid(), signal.SIGTERM)  # the second, before the step ends
        original(self, sync)

    monkeypatch.setattr(perf.PerfMeter, "step_done", two_signals_in_step_three)
    monkeypatch.chdir(REPO)
    code = main(["train", "recipes/demo.yaml", *SHORT_RUN, f"output.dir={tmp_path}"])
    assert code == 143
    said = " ".join(capsys.readouterr().out.split())
    assert "stopped (SIGTERM) before anything was saved: removed" in said
    assert not list(tmp_path.glob("meebs_demo/*"))


def test_a_second_signal_after_a_saved_epoch_keeps_the_run_resumable(tmp_path, monkeypatch, capsys):
    original = perf.PerfMeter.step_done

    def two_signals_in_epoch_two(self, sync=True):
        if self.steps == 40:  # of 60: the demo's epoch 1 (30 steps) is saved
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        original(self, sync)

    monkeypatch.setattr(perf.PerfMeter, "step_done", two_signals_in_epoch_two)
    monkeypatch.chdir(REPO)
    argv = ["train", "recipes/demo.yaml", *SHORT_RUN, "sample.every_n_epochs=0"]
    assert main([*argv, f"output.dir={tmp_path}"]) == 130
    (run,) = tmp_path.glob("meebs_demo/*")
    said = " ".join(capsys.readouterr().out.split())
    assert f"continue from the last saved state with: train --resume {run}" in said
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["meebs_demo-000001.safetensors"]
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    ctrl_c_while_caching(monkeypatch)
    assert main(["train", "--resume", str(run)]) == 130  # the resumed run's own caching
    said = " ".join(capsys.readouterr().out.split())
    assert "nothing since the last save was kept" in said
    assert f"continue from the last saved state with: train --resume {run}" in said
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert main(["train", "--resume", str(run)]) == 0


def ctrl_c_while_caching(monkeypatch) -> None:
    original = latent_io.LatentCache.fill

    def fill_then_ctrl_c(self, variants):
        for done, item in enumerate(original(self, variants)):
            if done == 1:
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    monkeypatch.setattr(latent_io.LatentCache, "fill", fill_then_ctrl_c)


def test_ctrl_c_while_caching_latents_removes_the_new_run(tmp_path, monkeypatch, capsys):
    """Nothing was trained: a folder that `--resume` would refuse is not left behind."""
    ctrl_c_while_caching(monkeypatch)
    monkeypatch.chdir(REPO)
    code = main(["train", "recipes/demo.yaml", *SHORT_RUN, f"output.dir={tmp_path}"])
    assert code == 130
    assert not list(tmp_path.glob("meebs_demo/*"))
    assert "before anything was saved: removed" in " ".join(capsys.readouterr().out.split())
