"""The user's path as written: every recipe in `recipes/` through save, Ctrl-C and
`train --resume`, byte-identical to the run that never stopped (every optimizer of the
schema goes through the same round trip in tests/test_optim.py).

Each recipe runs as its file says (optimizer, precision fallback, schedule, text-encoder
LR, noise offset, samples, validation) with only the size changed: the random `tiny`
base instead of SD 1.5, 64 px, the first images of each of its folders, 2 epochs, and its
sample prompts drawn at 64 px. A recipe added to `recipes/` is covered without touching
this file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from engine_runs import interrupt_at
from safetensors import safe_open

from meebs.cli import main
from meebs.plan.steps import make_plan, scan_data
from meebs.recipe.loading import load_recipe

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
SIZE = 64


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Recipes name their data relative to the repository root, as in `make`."""
    monkeypatch.chdir(REPO)


def small_copy(folder: str | None, to: Path, images: int) -> Path | None:
    """The first `images` images (and captions) of each `N_name` subfolder, in the same
    layout."""
    if folder is None:
        return None
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        (to / sub.name).mkdir(parents=True)
        for image in sorted(sub.glob("*.png"))[:images]:
            for twin in sub.glob(image.stem + ".*"):
                shutil.copy(twin, to / sub.name / twin.name)
    return to


def resized(recipe_name: str, tmp: Path) -> list[str]:
    """Command-line overrides that change only the size of `recipes/{recipe_name}.yaml`."""
    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml")
    data, validation = recipe.data, recipe.validation
    # One image per folder; two where validation holds a fraction of them out, so one is
    # left to train on.
    images = 2 if validation.enabled and not validation.folder else 1
    overrides = [
        "model.builtin=tiny",
        "model.path=null",
        "model.sha256=null",
        f"data.resolution={SIZE}",
        "train.epochs=2",
        f"data.train_dir={small_copy(data.train_dir, tmp / 'data' / 'train', images)}",
    ]
    if data.reg_dir:
        overrides.append(f"data.reg_dir={small_copy(data.reg_dir, tmp / 'data' / 'reg', images)}")
    if validation.folder:
        overrides.append(
            f"validation.folder={small_copy(validation.folder, tmp / 'data' / 'val', images)}"
        )
    prompts = [re.sub(r"--([wh]) \d+", rf"--\1 {SIZE}", p) for p in recipe.sample.prompts]
    overrides.append(f"sample.prompts={yaml.safe_dump(prompts, default_flow_style=True).strip()}")
    return overrides


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(run: Path) -> dict[str, str]:
    """Network files and samples (name -> sha256), without the files a stop adds."""
    files = [*run.glob("*.safetensors"), *run.glob("samples/*.png")]
    return {p.name: sha(p) for p in sorted(files) if "-step" not in p.name}


def without_seconds(value):
    """`value` without its timings (`seconds`), which no two runs share."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def recorded(run: Path) -> dict:
    """What the manifest says the run computed: losses and every validation score."""
    manifest = json.loads((run / "manifest.json").read_text())
    validation = without_seconds(manifest.get("validation", {}))
    return {"status": manifest["status"], "losses": manifest["epoch_losses"], "val": validation}


def stop_and_resume(monkeypatch, recipe_file: str, overrides: list[str], out: Path) -> Path:
    """Ctrl-C mid epoch 2, then `train --resume`; returns the run folder."""
    recipe = load_recipe(recipe_file, overrides)
    plan = make_plan(recipe, scan_data(recipe))
    stop_at = plan.steps_per_epoch + max(1, plan.steps_per_epoch // 2)
    assert stop_at < plan.total_steps, "the size chosen leaves no step after the stop"
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_at)
        assert main(["train", recipe_file, *overrides]) == 130
    (run,) = out.glob("*/*")
    state = json.loads((run / "manifest.json").read_text())
    assert state["status"] == "interrupted" and state["steps"] == stop_at
    with safe_open(run / "resume.state", "pt") as f:  # a safetensors file: no pickle
        assert any(key.startswith("optimizer/") for key in f.keys())  # noqa: SIM118
        assert json.loads(f.metadata()["meebs_state"])["position"]["step"] == stop_at
    assert main(["train", "--resume", str(run)]) == 0
    assert not (run / "resume.state").exists()
    return run


def train_whole(recipe_file: str, overrides: list[str], out: Path) -> Path:
    assert main(["train", recipe_file, *overrides]) == 0
    (run,) = out.glob("*/*")
    return run


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_stops_and_resumes_to_the_same_bytes(name, tmp_path, monkeypatch):
    recipe_file = f"recipes/{name}.yaml"
    overrides = resized(name, tmp_path)
    whole_out = [*overrides, f"output.dir={tmp_path / 'whole'}"]
    whole = train_whole(recipe_file, whole_out, tmp_path / "whole")
    cut_out = [*overrides, f"output.dir={tmp_path / 'cut'}"]
    cut = stop_and_resume(monkeypatch, recipe_file, cut_out, tmp_path / "cut")

    recipe = load_recipe(recipe_file, overrides)
    expected = {f"{recipe.output.name}.safetensors", f"{recipe.output.name}-000001.safetensors"}
    if recipe.output.save_every_n_epochs != 1:
        expected.discard(f"{recipe.output.name}-000001.safetensors")
    assert expected <= set(outputs(whole))
    if recipe.sample.every_n_epochs:
        assert any(name.endswith(".png") for name in outputs(whole))
    assert outputs(cut) == outputs(whole)
    assert recorded(cut) == recorded(whole)
    assert recorded(whole)["status"] == "finished"
    assert bool(recorded(whole)["val"]) == recipe.validation.enabled
