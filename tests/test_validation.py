"""Validation (#8): the split, deterministic scores, class drift and the recommendation."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from meebs.data.folders import ImageItem
from meebs.errors import MeebsError
from meebs.plan.report import print_plan
from meebs.plan.steps import make_plan, scan_data
from meebs.recipe.loading import load_recipe
from meebs.training import loop as loop_module
from meebs.training import validation
from meebs.training.train import prepare, train
from meebs.training.validation import Validator, spread_timesteps

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"
# Engine mechanics, not learning: the random `tiny` base (the demo's own base is tiny-trained).
FAST = ["model.builtin=tiny", "train.epochs=2", "train.batch_size=4", "sample.every_n_epochs=0"]
FRACTION = ["validation.folder=null", "validation.fraction=0.34"]


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(DEMO, [*FAST, f"output.dir={tmp_path}", *overrides])


def held_out(tmp_path, *overrides):
    return [im.path.name for im in scan_data(recipe(tmp_path, *FRACTION, *overrides)).held_out]


def test_timesteps_spread_over_the_schedule():
    assert spread_timesteps(8, 1000) == [62, 187, 312, 437, 562, 687, 812, 937]


def test_split_is_stable_under_its_seed_and_changes_with_it(tmp_path):
    first = held_out(tmp_path)
    assert len(first) == 2  # round(0.34 x 6)
    assert held_out(tmp_path) == first
    assert held_out(tmp_path, "train.seed=7") == first  # the training seed has no say
    assert any(held_out(tmp_path, f"validation.seed={s}") != first for s in range(1, 5))


def test_held_out_images_leave_the_plan(tmp_path):
    scan = scan_data(recipe(tmp_path, *FRACTION))
    plan = make_plan(recipe(tmp_path, *FRACTION), scan)
    assert scan.num_train_images == 4 and plan.train_samples == 40
    trained = {im.path for s in scan.train for im in s.images}
    assert not trained & {im.path for im in scan.held_out}
    console = Console(record=True, width=200)
    print_plan(recipe(tmp_path, *FRACTION, "train.batch_size=3"), scan, plan, console)
    text = console.export_text()
    assert "Validation images" in text and scan.held_out[0].path.name in text
    assert "no longer divide by batch size 3" in text


def test_bad_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(MeebsError, match="leaving none to train on"):
        scan_data(recipe(tmp_path, "validation.folder=null", "validation.fraction=0.95"))
    overlap = tmp_path / "val" / "1_meeb"
    overlap.mkdir(parents=True)
    shutil.copy(REPO / "data/demo/train/10_meeb/meeb_004.png", overlap / "copy.png")
    with pytest.raises(MeebsError, match=r"same file as training image .*meeb_004\.png"):
        scan_data(recipe(tmp_path, f"validation.folder={tmp_path / 'val'}"))
    with pytest.raises(MeebsError, match=r"validation\.fraction"):
        recipe(tmp_path, "validation.folder=null", "validation.fraction=0")
    scan = scan_data(recipe(tmp_path, "data.reg_dir=null"))
    assert any("class drift is not measured" in w for w in scan.warnings)


def test_untrained_network_has_zero_drift_and_scores_are_repeatable(tmp_path):
    loop = prepare(recipe(tmp_path), Console(quiet=True))
    validator = Validator(loop, Console(quiet=True))
    streams = (torch.get_rng_state(), loop.vae_gen.get_state(), loop.data.rng.getstate())
    first = validator.evaluate(0, 0)
    assert first.class_drift == 0.0 and set(first.class_drift_bands.values()) == {0.0}
    with torch.no_grad():  # a trained-looking network: every parameter moved
        for p in loop.network.parameters():
            p.add_(0.05)
    second, third = validator.evaluate(1, 1), validator.evaluate(1, 1)
    assert second.subject_loss != first.subject_loss and second.class_drift != 0.0
    assert (second.subject_loss, second.class_drift) == (third.subject_loss, third.class_drift)
    assert second.subject_bands == third.subject_bands
    after = (torch.get_rng_state(), loop.vae_gen.get_state(), loop.data.rng.getstate())
    assert torch.equal(streams[0], after[0]) and torch.equal(streams[1], after[1])
    assert streams[2] == after[2] and loop.network.training


def image_paths(value) -> list[Path]:
    """Every ImageItem's path inside `value` (lists, tuples, named tuples, nesting)."""
    if isinstance(value, ImageItem):
        return [value.path]
    if isinstance(value, (list, tuple)):
        return [path for part in value for path in image_paths(part)]
    return []


@contextmanager
def trained_paths():
    """The paths of the images in every batch the loop actually trains on."""
    seen: list[Path] = []
    original = loop_module.Loop._micro_step

    def spy(self, *args, **kwargs):
        seen.extend(image_paths(args))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module.Loop, "_micro_step", spy)
        yield seen


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe (validation on), with the images of every trained batch."""
    console = Console(record=True, width=200)
    r = load_recipe(DEMO, [*FAST, f"output.dir={tmp_path_factory.mktemp('val')}"])
    with trained_paths() as trained:
        result = train(r, console)
    return result, console.export_text(), trained


@pytest.mark.slow
def test_demo_run_recommends_a_better_epoch(demo_run):
    result, text, _ = demo_run
    report = json.loads((result.run_dir / "validation.json").read_text())
    assert report == result.validation
    assert report["held_out"] == ["meeb_029.png"]
    scores = {e["epoch"]: e for e in report["evaluations"]}
    assert sorted(scores) == [0, 1, 2] and scores[0]["class_drift"] == 0.0
    best = result.recommended_epoch
    assert best in (1, 2) and scores[best]["subject_loss"] < scores[0]["subject_loss"]
    assert "Validation per saved epoch" in text and "meebs_demo-000001.safetensors" in text
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["validation"] == report and result.validation_s > 0
    with safe_open(result.files[-1], "pt") as f:
        assert f.metadata()["meebs_recommended_epoch"] == str(best)
    with safe_open(result.files[0], "pt") as f:
        assert "meebs_recommended_epoch" not in f.metadata()
    events = EventAccumulator(str(result.run_dir / "logs")).Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("val/subject_loss", "val/class_drift"):
        assert {name, *(f"{name}/{band}" for band in ("low", "mid", "high"))} <= tags
    assert [e.step for e in events.Scalars("val/subject_loss")] == [0, 30, 60]


@pytest.mark.slow
def test_fraction_run_never_trains_on_held_out_images(tmp_path):
    r = recipe(tmp_path, *FRACTION, "train.epochs=1")
    with trained_paths() as trained:
        result = train(r, Console(quiet=True))
    held = {im.path for im in scan_data(r).held_out}
    assert len(held) == 2 and trained and not held & set(trained)
    assert result.steps == 20  # 4 images x 10 repeats + 40 reg partners, batch 4


@pytest.mark.slow
def test_validation_on_or_off_writes_the_same_tensors(tmp_path, demo_run):
    result, _, trained = demo_run
    assert Path(REPO / "data/demo/val/1_meeb/meeb_029.png").resolve() not in {
        p.resolve() for p in trained
    }
    off = train(recipe(tmp_path, "validation.enabled=false"), Console(quiet=True))
    assert not off.validation and off.recommended_epoch is None
    for with_val, without in zip(result.files, off.files, strict=True):
        a, b = load_file(with_val), load_file(without)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_images_share_forwards_without_changing_a_score(tmp_path, monkeypatch):
    """Batched forwards (the demo's seven images in one, grouped by latent size) score
    exactly as one image per forward does."""
    val = tmp_path / "val" / "1_meeb"
    val.mkdir(parents=True)
    Image.open(REPO / "data/demo/val/1_meeb/meeb_029.png").resize((192, 64)).save(val / "wide.png")
    (val / "wide.txt").write_text("meeb, lying down")
    wide = [
        f"validation.folder={tmp_path / 'val'}",
        "data.resolution=128",
        "data.enable_bucket=true",
        "data.min_bucket_reso=64",
    ]
    loop = prepare(recipe(tmp_path, *wide), Console(quiet=True))
    validator = Validator(loop, Console(quiet=True))
    assert len({v.size for v in validator.variants.values()}) == 2
    with torch.no_grad():
        for p in loop.network.parameters():
            p.add_(0.05)
    forwards: list[int] = []
    original = loop.math.denoising_losses

    def counting(latents, *args):
        forwards.append(len(latents))
        return original(latents, *args)

    monkeypatch.setattr(loop.math, "denoising_losses", counting)
    validator.evaluate(0, 0)  # the base model's class losses, computed once
    forwards.clear()
    batched = validator.evaluate(1, 1)
    assert forwards == [8, 48]  # the wide image alone, then the six square ones
    monkeypatch.setattr(validation, "FORWARD_LATENT_PIXELS", 1)
    forwards.clear()
    single = validator.evaluate(1, 1)
    assert forwards == [8] * 7
    assert single.subject_loss == pytest.approx(batched.subject_loss, rel=1e-6)
    assert single.class_drift == pytest.approx(batched.class_drift, rel=1e-5, abs=1e-9)
