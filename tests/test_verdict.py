"""verdict: a shortened demo-learn on the tiny-trained base must move the trigger prompt
towards meebs and keep the class prompt's people; the table, JSON and grid are written,
and bad input gets one line.

The shortening: 3 epochs of 10 (480 steps, ~1.7 min on 2 cores) at 1.5x the recipe's
learning rate, without per-epoch samples (the verdict draws its own). Measured on 16
seeds: meeb rate 12% by colour and 50% by shape at epoch 3, class kept 100%. 2 epochs at
2x the rate did not learn (0% / 6%); the full recipe's per-epoch figures are in
docs/quality.md (`make demo-learn`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from meebs.errors import MeebsError
from meebs.recipe.loading import load_recipe
from meebs.tiny.verdict import GRID_NAME, GRID_SEEDS, RESULT_NAME, latest_run, make_verdict
from meebs.training.train import train

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
DEMO_LEARN = REPO / "recipes" / "demo-learn.yaml"
SEEDS = tuple(range(1000, 1016))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    overrides = [
        "train.epochs=3",
        "train.learning_rate=1.5e-2",
        "sample.every_n_epochs=0",
        "output.save_every_n_epochs=3",
        f"output.dir={root}",
    ]
    recipe = load_recipe(DEMO_LEARN, overrides)
    return train(recipe, Console(quiet=True)).run_dir


@pytest.fixture(scope="module")
def rows(run):
    return make_verdict(run, Console(quiet=True), seeds=SEEDS)


def test_three_epochs_move_the_trigger_towards_meebs_and_keep_people(rows):
    base, epoch = rows
    print(rows)
    assert (base.label, epoch.label, epoch.epoch) == ("base", "epoch 3", 3)
    assert base.meeb_rate <= 0.05 and base.meeb_rate_shape <= 0.05
    assert epoch.meeb_rate_shape >= base.meeb_rate_shape + 0.2
    assert epoch.meeb_rate > base.meeb_rate
    assert epoch.class_rate >= 0.8 * base.class_rate


def test_json_and_grid(run, rows):
    result = json.loads((run / RESULT_NAME).read_text())
    assert result["trigger_prompt"] == "meeb, standing"
    assert result["class_prompt"] == "person, standing"
    assert result["seeds"] == list(SEEDS)
    assert [row["label"] for row in result["rows"]] == ["base", "epoch 3"]
    assert result["recommended_epoch"] == 3
    grid = Image.open(run / GRID_NAME)
    assert grid.width > 2 * 128 and grid.height > 2 * GRID_SEEDS * 128


def test_latest_run_and_bad_input(run, tmp_path):
    assert latest_run(run.parent) == run
    assert latest_run(run) == run
    with pytest.raises(MeebsError, match="not a run folder"):
        make_verdict(tmp_path, Console(quiet=True))
    with pytest.raises(MeebsError, match="no meeb scorer"):
        make_verdict(run, Console(quiet=True), scorer_dir=tmp_path)
