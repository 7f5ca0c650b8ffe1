"""Step math and file names, against hand-computed cases on the demo data.

Demo data: 6 training images x 10 repeats = 60 samples, 6 reg images balanced to 60.
"""

from pathlib import Path

import pytest

from meebs.plan.steps import epoch_file_names, make_plan, scan_data
from meebs.recipe.loading import load_recipe

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


def plan_for(monkeypatch, *overrides):
    monkeypatch.chdir(DEMO.parent.parent)
    recipe = load_recipe(DEMO, list(overrides))
    return make_plan(recipe, scan_data(recipe))


def test_demo_with_reg_images(monkeypatch):
    plan = plan_for(monkeypatch, "train.epochs=3", "train.batch_size=2")
    assert (plan.train_samples, plan.reg_samples) == (60, 60)
    assert plan.batches_per_epoch == 60  # (60 + 60) / 2
    assert plan.steps_per_epoch == 60 and plan.total_steps == 180
    assert plan.original_formula_steps == 90  # 6 * 10 * 3 / 2: without the reg partners
    assert plan.kohya_gui_steps == 180  # the GUI's x2 for reg
    assert plan.warmup_steps == 9  # 5 % of 180


def test_without_reg_and_with_gradient_accumulation(monkeypatch):
    plan = plan_for(
        monkeypatch,
        "data.reg_dir=null",
        "train.batch_size=4",
        "train.gradient_accumulation_steps=4",
        "train.epochs=2",
    )
    assert plan.reg_samples == 0
    assert plan.batches_per_epoch == 15  # 60 / 4
    assert plan.steps_per_epoch == 4  # ceil(15 / 4)
    assert plan.total_steps == 8
    assert plan.kohya_gui_steps == 8  # ceil(60 / 4 / 4 * 2) = ceil(7.5)


def test_batches_round_up_per_bucket(monkeypatch):
    plan = plan_for(monkeypatch, "data.reg_dir=null", "train.batch_size=7")
    assert plan.batches_per_epoch == 9  # ceil(60 / 7): the last batch is short


@pytest.mark.parametrize(
    ("epochs", "every", "expected"),
    [
        (3, 1, [(1, "n-000001"), (2, "n-000002"), (3, "n")]),
        (5, 2, [(2, "n-000002"), (4, "n-000004"), (5, "n")]),
        (4, 2, [(2, "n-000002"), (4, "n")]),  # the last epoch is always the plain name
        (1, 5, [(1, "n")]),
    ],
)
def test_file_names_follow_save_every_n_epochs(epochs, every, expected):
    names = epoch_file_names("n", epochs, every)
    assert names == [(e, f"{stem}.safetensors") for e, stem in expected]
