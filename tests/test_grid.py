"""grid: a run's sample prompts x epoch files x weights in one labelled PNG, also in TensorBoard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from meebs.errors import MeebsError
from meebs.use.grid import make_grid, parse_numbers

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def run(short_demo, tmp_path_factory) -> Path:
    """A copy of the session's 2-epoch demo run (two epoch files, two sample prompts of
    64x64): the grid writes into the run folder and its logs."""
    copy = tmp_path_factory.mktemp("outputs") / "meebs_demo" / short_demo.run_dir.name
    shutil.copytree(short_demo.run_dir, copy)
    return copy


def cells(grid: Image.Image, rows: int, columns: int) -> dict[tuple[int, int], np.ndarray]:
    """Cut the grid into its image cells, knowing only its size and the counts.

    The label column and header are whatever the grid's width/height leave after the
    cells; cells are square (64 px samples enlarged to 128) with a 4 px gap.
    """
    cell, gap = 128, 4
    left = grid.width - columns * (cell + gap)
    top = grid.height - rows * (cell + gap)
    array = np.asarray(grid)
    return {
        (row, column): array[
            top + row * (cell + gap) : top + row * (cell + gap) + cell,
            left + column * (cell + gap) : left + column * (cell + gap) + cell,
        ]
        for row in range(rows)
        for column in range(columns)
    }


def test_grid_has_prompts_by_epochs_by_weights(run):
    out = make_grid(run, Console(quiet=True), weights=[0.0, 1.0], seeds=[3, 4])
    assert out == run / "grid.png"
    grid = Image.open(out)
    # 2 prompts x 2 seeds = 4 rows; 2 epochs x 2 weights = 4 columns.
    parts = cells(grid, rows=4, columns=4)
    for row in range(4):
        # Weight 0 is the base model, whatever the epoch.
        assert np.array_equal(parts[row, 0], parts[row, 2])
        # Weight 1 of epoch 1 and 2 differ from the base and from each other.
        assert not np.array_equal(parts[row, 1], parts[row, 0])
        assert not np.array_equal(parts[row, 3], parts[row, 1])
    assert not np.array_equal(parts[0, 0], parts[1, 0])  # another seed, another image
    # The label areas hold dark text pixels.
    array = np.asarray(grid)
    assert (array[:, :100] < 100).any() and (array[:20, -128:] < 100).any()


def test_grid_goes_to_tensorboard_and_to_out(run, tmp_path):
    out = tmp_path / "g.png"
    make_grid(run, Console(quiet=True), out=out)
    assert Image.open(out).size[1] > 2 * 128  # two prompts, one weight
    events = EventAccumulator(str(run / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert "grid" in events.Tags()["images"]
    assert events.Images("grid")[-1].step == 60  # the final file's step


def test_same_grid_twice_is_the_same_file(run, tmp_path):
    first, second = tmp_path / "1.png", tmp_path / "2.png"
    make_grid(run, Console(quiet=True), out=first, seeds=[9])
    make_grid(run, Console(quiet=True), out=second, seeds=[9])
    assert first.read_bytes() == second.read_bytes()


def test_bad_input(run, tmp_path):
    with pytest.raises(MeebsError, match="not a run folder"):
        make_grid(tmp_path, Console(quiet=True))
    with pytest.raises(MeebsError, match="does not exist"):
        make_grid(run, Console(quiet=True), out=tmp_path / "no" / "g.png")
    with pytest.raises(MeebsError, match="comma-separated numbers"):
        parse_numbers("--weights", "0.5,x", float)
    assert parse_numbers("--seeds", "1, 2", int) == [1, 2]
    assert parse_numbers("--seeds", None, int) is None
