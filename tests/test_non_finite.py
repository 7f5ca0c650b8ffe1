"""No file with a NaN or inf in it is ever written: a diverged loss stops the run, and a
network that does not fit its save precision is refused, each with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_runs import SHORT_RUN
from safetensors.torch import load_file

from meebs.cli import main
from meebs.errors import TrainingDiverged
from meebs.models.builtin_models import build_tiny
from meebs.network.build import NetworkSpec, build_network
from meebs.network.save import save_network

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent


def test_a_diverging_loss_stops_the_run_and_writes_no_bad_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    argv = ["train", "recipes/demo.yaml", *SHORT_RUN, "train.learning_rate=1e6"]
    assert main([*argv, f"output.dir={tmp_path}", "sample.every_n_epochs=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "the loss became nan at step" in err and "lower train.learning_rate" in err
    (run,) = tmp_path.glob("meebs_demo/*")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "the loss became nan" in manifest["failure"]
    for path in [*run.glob("*.safetensors"), *run.glob("resume.state")]:
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


@pytest.fixture
def network():
    base = build_tiny()
    return build_network(base.unet, base.text_encoder, NetworkSpec(dim=4, alpha=1))


def test_a_network_that_overflows_fp16_is_refused_not_written(network, tmp_path):
    """Finite in fp32, inf once cast to fp16: the cast file would be silently broken."""
    with torch.no_grad():
        next(iter(network.parameters())).fill_(1e5)  # fp16 ends at 65504
    path = tmp_path / "net.safetensors"
    with pytest.raises(TrainingDiverged, match=r"overflow fp16 to inf.*bf16 or fp32"):
        save_network(network, path, {}, torch.float16)
    assert list(tmp_path.iterdir()) == []
    save_network(network, path, {}, torch.bfloat16)  # bf16 holds 1e5
    assert all(torch.isfinite(t).all() for t in load_file(path).values())


def test_a_nan_network_is_refused_in_every_precision(network, tmp_path):
    with torch.no_grad():
        next(iter(network.parameters()))[0] = float("nan")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        with pytest.raises(TrainingDiverged, match="NaN or inf, so training has diverged"):
            save_network(network, tmp_path / "net.safetensors", {}, dtype)
    assert list(tmp_path.iterdir()) == []


def test_weights_that_overflow_at_an_epoch_end_leave_no_state_and_no_file(
    tmp_path, monkeypatch, capsys
):
    """The epoch's resume state is written before its file (tests/test_kill.py): the
    file's NaN/inf check runs first, so a state never holds what no file may hold."""
    from meebs.training.step import StepMath

    original = StepMath.optimizer_step
    steps: list[int] = []

    def overflow_at_the_end_of_epoch_one(self):
        original(self)
        steps.append(len(steps) + 1)
        if steps[-1] == 30:  # the demo's epoch 1 has 30 steps at batch 4
            with torch.no_grad():
                next(p for g in self.optimizer.param_groups for p in g["params"]).fill_(1e5)

    monkeypatch.setattr(StepMath, "optimizer_step", overflow_at_the_end_of_epoch_one)
    monkeypatch.chdir(REPO)
    argv = ["train", "recipes/demo.yaml", *SHORT_RUN, "sample.every_n_epochs=0"]
    assert main([*argv, f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "overflow fp16 to inf" in err and "Traceback" not in err
    (run,) = tmp_path.glob("meebs_demo/*")
    assert not list(run.glob("*.safetensors")) and not (run / "resume.state").exists()
