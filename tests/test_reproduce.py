"""Reproducibility, measured: reruns, manifests, reports, resume, and the bad inputs.

Every run here is the demo recipe on the tiny model, shortened (2 epochs, batch 4), and
goes through the real command line (`meebs.cli.main`) from the repository root, as a
user would type it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from engine_runs import SHORT_RUN, interrupt_at, snapshot
from PIL import Image

from meebs.cli import main
from meebs.recipe.loading import load_recipe
from meebs.repro.reproduce import machine_class

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """Recipes name their data relative to the repository root, as in `make`."""
    monkeypatch.chdir(REPO)


def train_cli(out: Path, *overrides: str, recipe: str = "recipes/demo.yaml") -> Path:
    """`entrypoint.py train` into `out`; returns the new run folder."""
    before = set(out.glob("meebs_demo/*"))
    assert main(["train", recipe, *SHORT_RUN, f"output.dir={out}", *overrides]) == 0
    (run,) = set(out.glob("meebs_demo/*")) - before
    return run


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def network_files(run: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(run.glob("*.safetensors"))}


@pytest.fixture
def first_run(short_demo) -> Path:
    """The session's short demo run (conftest.py), trained with `train_cli`'s command."""
    return short_demo.run_dir


# --------------------------------------------------------------------------- reproduce


def test_two_runs_are_byte_identical_and_reproduce_says_so(first_run, tmp_path, capsys):
    """`reproduce` trains the recipe again in a new run folder: its files are the first
    run's bytes, and the report says so."""
    capsys.readouterr()
    assert main(["reproduce", str(first_run), f"output.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "bit-identical: 2/2 files match" in out
    assert "same recipe, data, base model, code, packages and hardware class" in out
    (second,) = tmp_path.glob("meebs_demo/*")
    assert second != first_run
    assert len(network_files(first_run)) == 2
    assert network_files(second) == network_files(first_run)


def test_a_changed_image_is_named_with_nonzero_differences(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "demo", data)
    overrides = [f"data.train_dir={data / 'train'}", f"data.reg_dir={data / 'reg'}"]
    run = train_cli(tmp_path, *overrides, "train.epochs=1", "sample.every_n_epochs=0")
    image_path = sorted((data / "train").rglob("*.png"))[2]
    image = Image.open(image_path)
    image.load()
    image.rotate(90).save(image_path)
    capsys.readouterr()
    assert main(["reproduce", str(run)]) == 1
    out = capsys.readouterr().out
    relative = f"train/{image_path.parent.name}/{image_path.name}"
    assert f"{relative}: image changed" in out
    assert "differs: 0/1 files match" in out
    report = out[out.index("network files") :]  # after the rerun's own plan table
    row = next(line for line in report.splitlines() if "meebs_demo.safetensors" in line)
    max_abs = float(row.split("│")[3])
    assert max_abs > 0


def test_a_different_thread_count_is_named(first_run, tmp_path, capsys):
    capsys.readouterr()
    code = main(["reproduce", str(first_run), "train.threads=1", f"output.dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "threads: 2 -> 1" in out
    assert "train.threads: 2 -> 1" in out
    # the bits usually change with the thread count (REFERENCE.md section 9), but the
    # report must be consistent with the files either way
    files_match = "bit-identical" in out
    assert code == (0 if files_match else 1)


def test_another_layer_path_is_named_with_its_tiny_weight_difference(first_run, tmp_path, capsys):
    """The layer paths compute the same function, summing in another order: the rerun
    names the switch, and its weights differ from the original's in the last bits only."""
    capsys.readouterr()
    argv = ["reproduce", str(first_run), "train.loha_layer=factored", f"output.dir={tmp_path}"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert 'train.loha_layer: "fast" -> "factored"' in out
    rows = [line for line in out.splitlines() if "differs" in line and "│" in line]
    assert rows, out
    for row in rows:
        max_abs, rel_l2, cosine = (float(cell) for cell in row.split("│")[3:6])
        assert 0 < max_abs < 1e-2 and 0 < rel_l2 < 1e-3 and cosine > 0.9999, row


def test_compare_two_files_reports_weight_distances(first_run, short_demo_seed7, capsys):
    other = short_demo_seed7.run_dir
    capsys.readouterr()
    a, b = first_run / "meebs_demo.safetensors", other / "meebs_demo.safetensors"
    assert main(["compare", str(a), str(b)]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if "differs" in line)
    max_abs, rel_l2, cosine = (float(cell) for cell in row.split("│")[3:6])
    assert max_abs > 0 and 0 < rel_l2 < 10 and -1 <= cosine < 1
    assert main(["compare", str(a), str(a)]) == 0


def test_compare_two_runs_names_the_recipe_difference(first_run, short_demo_seed7, capsys):
    other = short_demo_seed7.run_dir
    capsys.readouterr()
    assert main(["compare", str(first_run), str(other)]) == 1
    out = capsys.readouterr().out
    assert "train.seed: 42 -> 7" in out and "sample.every_n_epochs: 1 -> 0" in out


# --------------------------------------------------------------------------- the manifest


def test_the_manifest_holds_every_field(first_run):
    manifest = json.loads((first_run / "manifest.json").read_text())
    recipe = load_recipe(
        REPO / "recipes/demo.yaml", [*SHORT_RUN, f"output.dir={first_run.parent.parent}"]
    )
    assert manifest["format"] == 1 and manifest["status"] == "finished"
    assert manifest["recipe"] == recipe.to_dict() and manifest["recipe_sha256"] == recipe.sha256()
    assert manifest["recipe_source"] == {
        "file": "recipes/demo.yaml",
        "overrides": [*SHORT_RUN, f"output.dir={first_run.parent.parent}"],
    }
    files = manifest["data"]["files"]
    on_disk = sorted((REPO / "data/demo").rglob("*.png"))
    assert len(files) == len(on_disk)
    for entry in files:
        path = REPO / "data/demo" / entry["path"]
        assert entry["sha256"] == sha(path)
        assert entry["caption"] == path.with_suffix(".txt").read_text().strip()
    assert len(manifest["data"]["sha256"]) == 64
    assert manifest["base_model"]["name"] == "tiny" and len(manifest["base_model"]["sha256"]) == 64
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert manifest["code"]["git_commit"] == (commit or None)
    assert isinstance(manifest["code"]["git_dirty"], bool | None)
    assert "image_digest" in manifest
    assert manifest["python"] == platform.python_version()
    assert manifest["packages"]["torch"] == torch.__version__
    assert {"lycoris-lora", "diffusers", "safetensors"} <= manifest["packages"].keys()
    hardware = manifest["hardware"]
    assert hardware["machine"] == platform.machine() and hardware["device"] == "cpu"
    assert hardware["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hardware["cpu_model"] and hardware["threads"] == 2 and hardware["gpu"] is None
    assert {"cuda", "cudnn", "driver", "cpu_vendor", "cpu_family_model"} <= hardware.keys()
    assert manifest["hardware_class"] == machine_class()
    determinism = manifest["determinism"]
    assert determinism["deterministic_algorithms"] is True and determinism["tf32"] is False
    assert determinism["cudnn_benchmark"] is False and determinism["threads"] == 2
    assert determinism["nondeterministic_ops"] == []
    assert manifest["outputs"] == network_files(first_run)
    assert set(manifest["samples"]) == {p.name for p in (first_run / "samples").glob("*.png")}
    assert len(manifest["epoch_losses"]) == 2 and all(x > 0 for x in manifest["epoch_losses"])
    assert manifest["steps"] == manifest["planned_steps"] == 60
    assert manifest["duration_s"] > 0 and manifest["started_at"] <= manifest["finished_at"]
    assert manifest["command"].startswith("entrypoint.py train recipes/demo.yaml")
    assert manifest["perf"]["steps_per_second"] > 0


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("step", [12, 37])  # mid epoch 1 (before any save), mid epoch 2
def test_interrupt_then_resume_gives_the_uninterrupted_bytes(
    first_run, tmp_path, monkeypatch, step
):
    interrupt_at(monkeypatch, step)
    assert main(["train", "recipes/demo.yaml", *SHORT_RUN, f"output.dir={tmp_path}"]) == 130
    (run,) = tmp_path.glob("meebs_demo/*")
    assert (run / "resume.state").is_file()
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert main(["train", "--resume", str(run)]) == 0
    resumed = network_files(run)
    assert resumed.pop(f"meebs_demo-step{step:08d}.safetensors")
    assert resumed == network_files(first_run)
    samples = {p.name: sha(p) for p in (first_run / "samples").glob("*.png")}
    assert {p.name: sha(p) for p in (run / "samples").glob("*.png")} == samples
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["segments"]) == 2
    assert (
        manifest["epoch_losses"]
        == json.loads((first_run / "manifest.json").read_text())["epoch_losses"]
    )
    assert not (run / "resume.state").exists()


def test_resume_with_random_data_choices_and_uncached_latents(tmp_path, monkeypatch):
    """Flips, caption shuffle/dropout and per-step VAE sampling all continue exactly.

    On a copy of the demo data that repeats each image 3 times, not 10: 9 steps an epoch.
    """
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "demo", data)
    (data / "train" / "10_meeb").rename(data / "train" / "3_meeb")
    extra = [
        f"data.train_dir={data / 'train'}",
        f"data.reg_dir={data / 'reg'}",
        "data.cache_latents=false",
        "data.flip_aug=true",
        "data.shuffle_caption=true",
        "data.caption_dropout_rate=0.3",
        "sample.every_n_epochs=0",
    ]
    whole = train_cli(tmp_path / "whole", *extra)
    interrupt_at(monkeypatch, 5)  # mid epoch 1: epoch 2 draws its choices after the resume
    assert (
        main(["train", "recipes/demo.yaml", *SHORT_RUN, f"output.dir={tmp_path / 'cut'}", *extra])
        == 130
    )
    (run,) = (tmp_path / "cut").glob("meebs_demo/*")
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert main(["train", "--resume", str(run)]) == 0
    resumed = network_files(run)
    resumed.pop("meebs_demo-step00000005.safetensors")
    assert resumed == network_files(whole)


# --------------------------------------------------------------------------- bad input


def error_of(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err
    return " ".join(err.split())


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "not a run (no manifest.json)" in error_of(capsys, "reproduce", str(tmp_path))
    assert "no such run folder" in error_of(capsys, "reproduce", str(tmp_path / "nope"))


def test_a_truncated_manifest(first_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(first_run, copy)
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[: len(text) // 2])
    before = snapshot(copy)
    assert "not valid JSON" in error_of(capsys, "reproduce", str(copy))
    assert "not valid JSON" in error_of(capsys, "train", "--resume", str(copy))
    assert snapshot(copy) == before


def test_a_manifest_from_a_newer_version(first_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(first_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    assert "format 99 is newer" in error_of(capsys, "reproduce", str(copy))


def test_a_manifest_missing_fields(first_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(first_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["data"], manifest["hardware"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "missing data, hardware" in error_of(capsys, "reproduce", str(copy))


def test_reproduce_refuses_when_the_recipe_file_changed(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    shutil.copy(REPO / "recipes/demo.yaml", recipe)
    run = train_cli(tmp_path, "train.epochs=1", "sample.every_n_epochs=0", recipe=str(recipe))
    recipe.write_text(recipe.read_text().replace("seed: 42", "seed: 43"))
    runs_before = sorted(tmp_path.glob("meebs_demo/*"))
    message = error_of(capsys, "reproduce", str(run))
    assert f"{recipe} changed since run" in message and "train.seed: 42 -> 43" in message
    assert sorted(tmp_path.glob("meebs_demo/*")) == runs_before


def test_resume_refuses_a_finished_run(first_run, capsys):
    before = snapshot(first_run)
    assert "finished all 60 steps; nothing to resume" in error_of(
        capsys, "train", "--resume", str(first_run)
    )
    assert snapshot(first_run) == before


def test_resume_refuses_a_different_recipe(tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 5)
    assert (
        main(
            [
                "train",
                "recipes/demo.yaml",
                *SHORT_RUN,
                f"output.dir={tmp_path}",
                "sample.every_n_epochs=0",
            ]
        )
        == 130
    )
    (run,) = tmp_path.glob("meebs_demo/*")
    before = snapshot(run)
    message = error_of(capsys, "train", "recipes/demo.yaml", "train.epochs=5", "--resume", str(run))
    assert "train.epochs: 2 -> 5" in message and "train.batch_size: 4 -> 2" in message
    assert snapshot(run) == before


def test_resume_refuses_changed_data(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "demo", data)
    interrupt_at(monkeypatch, 5)
    overrides = [f"data.train_dir={data / 'train'}", f"data.reg_dir={data / 'reg'}"]
    assert (
        main(["train", "recipes/demo.yaml", *SHORT_RUN, f"output.dir={tmp_path}", *overrides])
        == 130
    )
    (run,) = tmp_path.glob("meebs_demo/*")
    victim = sorted((data / "reg").rglob("*.png"))[0]
    victim.unlink()
    message = error_of(capsys, "train", "--resume", str(run))
    assert f"reg/{victim.parent.name}/{victim.name}: removed" in message


def test_record_copies_a_finished_run_and_never_overwrites(first_run, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["record", str(first_run), "--results", str(results)]) == 0
    (recorded,) = results.glob("demo/*.json")
    assert recorded.name == f"{machine_class()}.json"
    assert json.loads(recorded.read_text()) == json.loads((first_run / "manifest.json").read_text())
    assert "pass --replace" in error_of(capsys, "record", str(first_run), "--results", str(results))
    assert main(["record", str(first_run), "--results", str(results), "--replace"]) == 0


# --------------------------------------------------------------------------- the recorded demo


def test_make_reproduce_demo_against_the_committed_result(tmp_path, capsys):
    """`make reproduce RECIPE=demo`: bit-identical on a machine of the recorded kind; on
    another kind, the report must name the hardware difference."""
    (recorded,) = (REPO / "results" / "demo").glob("*.json")
    capsys.readouterr()
    code = main(["reproduce", "--recipe", "demo", f"output.dir={tmp_path}"])
    out = capsys.readouterr().out
    if recorded.stem == machine_class():
        assert code == 0, out
        assert "bit-identical: 3/3 files match" in out
    else:
        assert code in (0, 1)
        assert f"class: {recorded.stem} -> {machine_class()}" in out
