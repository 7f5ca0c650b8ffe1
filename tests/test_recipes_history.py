"""The version recipes 1.0, 1.1 and 1.3: what the history says each one is.

The data folders are made by `prep` from the meeb drawings; without them the plan checks
are skipped (the recipes themselves are still checked).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meebs.models.fetch import read_pins
from meebs.plan.sizes import plan_file_sizes
from meebs.plan.steps import make_plan, scan_data
from meebs.recipe.loading import load_recipe

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("1.0", "1.1", "1.3")
# The project notes' parameters (the issue's history).
NOTES = {
    "network.algo": "loha",
    "train.batch_size": 2,
    "train.unet_lr": 1e-4,
    "train.text_encoder_lr": 5e-5,
    "train.mixed_precision": "fp16",
    "output.save_precision": "fp16",
    "train.optimizer": "AdamW8bit",
    "train.noise_offset": 0.06,
    "data.resolution": [512, 512],
}


def recipe(version: str):
    return load_recipe(ROOT / "recipes" / f"{version}.yaml")


def value(loaded, key: str):
    section, name = key.split(".")
    return getattr(getattr(loaded, section), name)


@pytest.mark.parametrize("version", VERSIONS)
def test_recipe_has_the_notes_parameters_and_the_pinned_base(version):
    loaded = recipe(version)
    assert {key: value(loaded, key) for key in NOTES} == NOTES
    pin = read_pins()["sd15"]
    assert Path(loaded.model.path).name == pin.file and loaded.model.sha256 == pin.sha256


def test_each_version_changes_what_the_history_says():
    v10, v11, v13 = (recipe(version) for version in VERSIONS)
    assert v11.data.train_dir != v10.data.train_dir
    assert (v11.network, v11.train.learning_rate) == (v10.network, v10.train.learning_rate)
    assert v13.data == v11.data and v13.train == v11.train
    assert (v13.network.dim, v13.network.conv_dim) == (4, 4)
    assert (v11.network.dim, v11.network.conv_dim) != (4, 4)


def plan_for(version: str, monkeypatch):
    monkeypatch.chdir(ROOT)
    loaded = recipe(version)
    for folder in (loaded.data.train_dir, loaded.data.reg_dir):
        if not (ROOT / folder).is_dir():
            pytest.skip(f"{folder} is not there yet (made by `prep` from the drawings)")
    return make_plan(loaded, scan_data(loaded))


@pytest.mark.parametrize("version", VERSIONS)
def test_total_steps_within_the_notes_range(version, monkeypatch):
    plan = plan_for(version, monkeypatch)
    assert 1500 <= plan.total_steps <= 2000
    assert plan.reg_samples == plan.train_samples  # reg balanced: the x 2 in the header


def test_1_3_writes_the_epoch_3_file_the_original_prompt_used(monkeypatch):
    plan = plan_for("1.3", monkeypatch)
    names = [name for _, name in plan.files]
    assert len(names) >= 3
    assert "meeb_v1.3-000003.safetensors" in names


@pytest.mark.parametrize("version", VERSIONS)
def test_header_states_the_planned_steps_and_size(version, monkeypatch):
    """The header's arithmetic ("= 1800 steps", "each ~19.8 MB") is what `plan` computes."""
    plan = plan_for(version, monkeypatch)
    loaded = recipe(version)
    header = (ROOT / "recipes" / f"{version}.yaml").read_text(encoding="utf-8")
    steps = re.search(r"= (\d+) steps\.", header)
    size = re.search(r"each ~([\d.]+) MB", header)
    assert steps and size, "the header shows the step arithmetic and the file size"
    assert int(steps.group(1)) == plan.total_steps
    final = plan_file_sizes(loaded, scan_data(loaded), plan)[-1]
    assert float(size.group(1)) == round(final.most.file_bytes / 1e6, 1)
