"""Determinism settings and the pieces of a resumable state, without a training run."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

from meebs.errors import MeebsError
from meebs.recipe.loading import load_recipe
from meebs.runs.manifest import hardware, hardware_class
from meebs.training.determinism import (
    NondeterminismWatch,
    apply_determinism,
    nondeterminism_warnings,
)
from meebs.training.train_state import (
    Position,
    TrainState,
    load_state,
    rng_from_json,
    rng_to_json,
    save_state,
)

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


@pytest.fixture
def restore_torch_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_deterministic_by_default(restore_torch_settings):
    settings = apply_determinism(load_recipe(DEMO, ["train.threads=1"]))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    assert torch.get_num_threads() == 1 and settings["threads"] == 1
    assert settings["cublas_workspace_config"] == ":4096:8"
    assert nondeterminism_warnings(settings, set()) == []


def test_turning_determinism_off_is_said_out_loud(restore_torch_settings):
    settings = apply_determinism(load_recipe(DEMO, ["train.deterministic=false"]))
    assert not torch.are_deterministic_algorithms_enabled()
    assert settings["tf32"] and settings["cudnn_benchmark"]
    assert nondeterminism_warnings(settings, set()) == [
        "train.deterministic is off: a rerun may differ in the low bits"
    ]


def test_the_watch_collects_nondeterministic_ops_and_passes_other_warnings_on():
    watch = NondeterminismWatch()
    shown = []
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
    try:
        with watch.watching():
            for _ in range(3):  # the same op every step: recorded once
                warnings.warn(
                    "upsample_nearest2d_backward_out_cuda does not have a deterministic "
                    "implementation, but you set 'torch.use_deterministic_algorithms(True, "
                    "warn_only=True)'.",
                    UserWarning,
                    stacklevel=1,
                )
            warnings.warn("something else", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = previous
    assert watch.ops == {"upsample_nearest2d_backward_out_cuda"}
    assert shown == ["something else"]


def test_hardware_class_names_processor_and_threads():
    facts = hardware(torch.device("cpu"))
    name = hardware_class({**facts, "threads": 3})
    assert name.endswith("-3t") and facts["machine"].lower() in name
    assert facts["cpu_capability"].lower() in name
    gpu = {**facts, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "12.8"}
    assert hardware_class(gpu) == "cuda-nvidia-h100-80gb-hbm3-cu12.8"


def test_state_round_trip_keeps_every_bit(tmp_path):
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, betas=(0.8, 0.95))
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    rng = random.Random(5)
    position = Position(
        epoch=2,
        batch=3,
        step=9,
        epoch_rng=rng_to_json(rng.getstate()),
        epoch_losses=[0.1 + 1e-17, 1 / 3],
        losses=[0.25],
        files=["a.safetensors"],
    )
    generator = torch.Generator().manual_seed(3)
    state = TrainState(
        position=position,
        network=layer.state_dict(),
        optimizer=optimizer.state_dict(),
        lr_scheduler={"last_epoch": 9, "_last_lr": [0.1 / 3]},
        generators={"noise": generator.get_state()},
    )
    save_state(tmp_path / "resume.state", state)
    back = load_state(tmp_path / "resume.state")
    assert back.position == position and back.lr_scheduler == state.lr_scheduler
    assert rng_from_json(back.position.epoch_rng) == rng.getstate()
    assert all(torch.equal(back.network[k], v) for k, v in layer.state_dict().items())
    assert torch.equal(back.generators["noise"], generator.get_state())
    fresh = torch.optim.AdamW(layer.parameters(), lr=0.5)
    fresh.load_state_dict(back.optimizer)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95) and fresh.param_groups[0]["lr"] == 0.1
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)


def test_missing_or_corrupt_state_is_one_clear_error(tmp_path):
    with pytest.raises(MeebsError, match="no saved state to resume from"):
        load_state(tmp_path / "resume.state")
    (tmp_path / "resume.state").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(MeebsError, match="unreadable training state"):
        load_state(tmp_path / "resume.state")
