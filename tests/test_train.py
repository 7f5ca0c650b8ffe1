"""End to end on the demo data and the tiny model: files, metadata, logs, determinism."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from engine_runs import SHORT_RUN
from rich.console import Console
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from meebs.data import latents as latent_io
from meebs.data.images import load_image
from meebs.files.safetensors_io import file_sha256
from meebs.models.builtin_models import build_tiny
from meebs.network.build import build_network
from meebs.network.load_weights import load_network_weights
from meebs.plan.metadata import network_spec
from meebs.plan.sizes import plan_file_sizes
from meebs.plan.steps import make_plan, scan_data
from meebs.recipe.loading import load_recipe
from meebs.training.train import train

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"


def run(tmp_path: Path, *overrides: str):
    recipe = load_recipe(DEMO, [*SHORT_RUN, f"output.dir={tmp_path}", *overrides])
    return recipe, train(recipe, Console(quiet=True))


def test_writes_the_planned_files(short_demo):
    recipe, result = short_demo.recipe, short_demo
    names = sorted(p.name for p in result.run_dir.glob("*.safetensors"))
    assert names == ["meebs_demo-000001.safetensors", "meebs_demo.safetensors"]
    assert result.run_dir.parent == Path(recipe.output.dir) / "meebs_demo"
    assert (result.run_dir / "recipe.yaml").read_text() == recipe.to_yaml()
    record = json.loads((result.run_dir / "manifest.json").read_text())
    assert record["steps"] == 60 and list(record["outputs"]) == names  # in the order written
    assert record["status"] == "finished" and record["perf"]["steps_per_second"] > 0
    samples = sorted(p.name for p in (result.run_dir / "samples").glob("*.png"))
    assert len(samples) == 4 and all("_e000001_" in s or "_e000002_" in s for s in samples)


def test_metadata_is_kohya_style_and_has_no_clock(short_demo):
    recipe, result = short_demo.recipe, short_demo
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1"
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert meta["ss_output_name"] == "meebs_demo"
    assert meta["ss_training_comment"] == recipe.output.comment
    assert meta["ss_epoch"] == "2" and meta["ss_steps"] == "60"
    assert meta["ss_num_epochs"] == "2" and meta["ss_max_train_steps"] == "60"
    assert (
        meta["ss_num_train_images"] == "60" and meta["ss_num_reg_images"] == "6"
    )  # kohya: reg images x repeats
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_meeb": {"n_repeats": 10, "img_count": 6}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["meebs_recipe_sha256"] == recipe.sha256()
    assert not {k for k in meta if k.endswith("_at") or k == "modelspec.date"}
    raw = result.files[-1].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    keys = list(header["__metadata__"])
    assert keys == sorted(keys), "metadata keys are written in sorted order"


def test_plan_states_the_exact_size_of_every_file(short_demo):
    """The header differs per file (epoch, step, title; the final one names the
    recommended epoch): `plan` sizes each file with the metadata the run writes into it."""
    recipe, result = short_demo.recipe, short_demo
    scan = scan_data(recipe)
    planned = plan_file_sizes(recipe, scan, make_plan(recipe, scan))
    written = {path.name: path.stat().st_size for path in result.files}
    assert [file.name for file in planned] == list(written)
    for file in planned:
        assert file.least.file_bytes == file.most.file_bytes == written[file.name], file.name


def test_tensorboard_has_the_expected_tags(short_demo):
    events = EventAccumulator(str(short_demo.run_dir / "logs"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/step", "loss/average", "loss/epoch", "lr/unet", "lr/text_encoder"} <= scalars
    assert len(events.Scalars("loss/step")) == 60
    assert len(events.Scalars("loss/epoch")) == 2
    assert {"samples/00", "samples/01"} <= set(events.Tags()["images"])


def fixed_loss(network_file: Path | None, recipe) -> float:
    """Loss of the tiny model (+ network) on the demo images with fixed noise and timesteps."""
    base = build_tiny()
    torch.manual_seed(0)
    network = build_network(base.unet, base.text_encoder, network_spec(recipe))
    if network_file is not None:
        load_network_weights(network, network_file)
    images = sorted((REPO / "data/demo/train").glob("*/*.png"))
    pixels = torch.stack([load_image(p, (64, 64), "white") for p in images])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = latent_io.encode(base.vae, pixels, gen)
        ids = base.tokenizer(
            ["meeb person"] * len(images), padding="max_length", return_tensors="pt"
        )["input_ids"]
        hidden = base.text_encoder(ids).last_hidden_state
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (len(images),), generator=gen)
            pred = base.unet(base.noise_scheduler.add_noise(latents, noise, t), t, hidden).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 8


def test_training_lowers_the_loss_on_the_demo_data(short_demo):
    before = fixed_loss(None, short_demo.recipe)
    after = fixed_loss(short_demo.files[-1], short_demo.recipe)
    assert after < 0.8 * before, (before, after)


# A short run for the tests of one mechanism: one epoch of 10 steps (no class images, batch 6).
TEN_STEPS = ["train.epochs=1", "data.reg_dir=null", "train.batch_size=6", "sample.every_n_epochs=0"]


def test_different_seed_gives_different_weights(tmp_path):
    _, other = run(tmp_path, *TEN_STEPS, "train.seed=7")
    _, same_seed = run(tmp_path, *TEN_STEPS)
    assert other.steps == same_seed.steps == 10
    assert file_sha256(other.files[-1]) != file_sha256(same_seed.files[-1])


def test_ctrl_c_saves_the_last_finished_step(tmp_path, monkeypatch):
    """SIGINT during step 5: the step finishes, is saved as -step00000005, and we stop."""
    from meebs.training import perf

    original = perf.PerfMeter.step_done

    def interrupt_at_five(self, sync=True):
        original(self, sync)
        if self.steps == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(perf.PerfMeter, "step_done", interrupt_at_five)
    _, result = run(tmp_path, "sample.every_n_epochs=0")
    assert result.interrupted and result.steps == 5
    assert [p.name for p in result.run_dir.glob("*.safetensors")] == [
        "meebs_demo-step00000005.safetensors"
    ]
    record = json.loads((result.run_dir / "manifest.json").read_text())
    assert record["status"] == "interrupted" and record["perf"]["steps"] == 5
    assert (result.run_dir / "resume.state").is_file()
    assert not list(result.run_dir.glob(".*.tmp"))


def test_keep_last_n_epochs_removes_older_epoch_files(tmp_path):
    _, result = run(tmp_path, *TEN_STEPS, "train.epochs=3", "output.keep_last_n_epochs=1")
    names = sorted(p.name for p in result.run_dir.glob("*.safetensors"))
    assert names == ["meebs_demo-000002.safetensors", "meebs_demo.safetensors"]


def test_times_come_only_from_source_date_epoch(short_demo, monkeypatch):
    from meebs.plan.metadata import RunFacts, build_metadata
    from meebs.plan.steps import make_plan, scan_data

    recipe = short_demo.recipe
    monkeypatch.chdir(REPO)
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    facts = RunFacts("tiny", "0" * 64, None, "no", "AdamW", "sdpa", ())
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert "ss_training_started_at" not in build_metadata(
        recipe, scan, plan, facts, epoch=1, step=1
    )
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764000000")
    meta = build_metadata(recipe, scan, plan, facts, epoch=1, step=1)
    assert meta["ss_training_started_at"] == meta["ss_training_finished_at"] == "1764000000"
    assert meta["modelspec.date"] == "2025-11-24"


def test_gradient_accumulation_steps_match_the_plan(tmp_path):
    """15 batches of 4, accumulated by 4: steps after batches 4, 8, 12 and 15 (the short
    last group still steps, so nothing leaks into the next epoch)."""
    _, result = run(
        tmp_path,
        "data.reg_dir=null",
        "train.epochs=1",
        "train.gradient_accumulation_steps=4",
        "sample.every_n_epochs=0",
    )
    assert result.steps == 4
    with safe_open(result.files[-1], "pt") as f:
        assert f.metadata()["ss_steps"] == "4"
        assert f.metadata()["ss_max_train_steps"] == "4"


def test_starting_from_an_existing_network_file(short_demo, tmp_path):
    first = short_demo
    _, result = run(
        tmp_path, f"network.weights={first.files[-1]}", "train.epochs=1", "sample.every_n_epochs=0"
    )
    assert result.steps == 30
    with safe_open(result.files[-1], "pt") as f:
        assert json.loads(f.metadata()["meebs_recipe"])["network"]["weights"] == str(
            first.files[-1]
        )
