"""The planned file size against files really written by `save_network`.

The estimate builds the network on weightless modules from the shipped configs; here the
reference networks are built on real modules (the tiny built-in, and the full SD 1.5
from the `sd15_random_parts` fixture, made from REFERENCE's config, not our files) and
saved, and the sizes must agree within 0.1 %.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from meebs.metadata import RunFacts, build_metadata, network_spec
from meebs.models import build_tiny
from meebs.network import build_network, save_network
from meebs.plan import make_plan, print_plan, scan_data
from meebs.recipe import Recipe, load_recipe, recipe_from_dict
from meebs.size_estimate import estimate_network_file, network_shapes, safetensors_size

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "demo.yaml"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def recipe_with(model: dict, network: dict, **sections: dict) -> Recipe:
    raw = {"model": model, "data": {"train_dir": "unused"}, "output": {"name": "n"}}
    return recipe_from_dict({**raw, "network": network, **sections}, where="test")


def saved_size(tmp_path: Path, recipe: Recipe, unet, text_encoder, metadata) -> tuple[int, int]:
    """(file bytes, numbers stored) of the recipe's network built on real modules."""
    network = build_network(
        unet,
        text_encoder,
        network_spec(recipe),
        train_unet=recipe.unet_lr > 0,
        train_text_encoder=recipe.text_encoder_lr > 0,
    )
    path = tmp_path / "net.safetensors"
    save_network(network, path, metadata, SAVE_DTYPES[recipe.output.save_precision])
    numbers = sum(value.numel() for value in network.state_dict().values())
    network.restore()  # the SD 1.5 parts are shared by the whole session
    return path.stat().st_size, numbers


def assert_close(estimate: int, actual: int) -> None:
    assert math.isclose(estimate, actual, rel_tol=1e-3), (estimate, actual)


@pytest.mark.parametrize(
    ("network", "train", "precision"),
    [
        ({"algo": "loha", "dim": 4, "alpha": 1, "conv_dim": 4, "conv_alpha": 1}, {}, "fp16"),
        ({"algo": "loha", "dim": 8, "conv_dim": 2, "use_tucker": True}, {}, "fp32"),
        ({"algo": "locon", "dim": 16, "conv_dim": 0}, {"text_encoder_lr": 0}, "bf16"),
        ({"algo": "lora", "dim": 2, "conv_dim": 8}, {"unet_lr": 0}, "fp16"),
    ],
)
def test_tiny_network_file_size(tmp_path, network, train, precision):
    recipe = recipe_with(
        {"builtin": "tiny"}, network, train=train, output={"name": "n", "save_precision": precision}
    )
    metadata = {"ss_output_name": "n", "ss_network_dim": str(recipe.network.dim)}
    model = build_tiny()
    actual_bytes, actual_numbers = saved_size(
        tmp_path, recipe, model.unet, model.text_encoder, metadata
    )
    estimate = safetensors_size(network_shapes(recipe), precision, metadata)
    assert estimate.parameters == actual_numbers
    assert_close(estimate.file_bytes, actual_bytes)


def test_plan_estimate_matches_a_file_with_the_trainers_metadata(tmp_path, monkeypatch):
    """The whole `plan` path: the metadata a run writes is guessed before the run."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO, ["model.builtin=tiny"])  # the model built below
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    model = build_tiny()
    facts = RunFacts(
        base_name=model.name,
        base_sha256=model.sha256,
        base_legacy_hash=None,
        mixed_precision="no",
        optimizer="AdamW",
        attention="sdpa",
        fallbacks=("an example fallback note, as a CPU run would record",),
    )
    metadata = build_metadata(recipe, scan, plan, facts, epoch=plan.epochs, step=plan.total_steps)
    actual_bytes, _ = saved_size(tmp_path, recipe, model.unet, model.text_encoder, metadata)
    assert_close(estimate_network_file(recipe, scan, plan).file_bytes, actual_bytes)


def test_plan_prints_the_size(monkeypatch):
    from rich.console import Console

    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO)
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    console = Console(record=True, width=200)
    print_plan(recipe, scan, plan, console)
    estimate = estimate_network_file(recipe, scan, plan)
    assert f"Each network file: {estimate.describe()}" in console.export_text()


def test_estimate_leaves_the_random_state_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    network_shapes(recipe_with({"builtin": "tiny"}, {"algo": "loha"}))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "network",
    [
        {"algo": "loha", "dim": 4, "alpha": 1, "conv_dim": 4, "conv_alpha": 1},  # 1.3
        {"algo": "loha", "dim": 32, "alpha": 8, "conv_dim": 8, "conv_alpha": 2},  # 1.0 / 1.1
    ],
)
def test_sd15_network_file_size(tmp_path, sd15_random_parts, network):
    """A base model file that is not there yet still gives the SD 1.5 estimate."""
    unet, text_encoder = sd15_random_parts
    model = {"path": str(tmp_path / "v1-5-pruned-emaonly.safetensors")}
    recipe = recipe_with(model, network)
    metadata = {"ss_output_name": "n", "ss_training_comment": "x" * 2000}
    actual_bytes, actual_numbers = saved_size(tmp_path, recipe, unet, text_encoder, metadata)
    estimate = safetensors_size(network_shapes(recipe), "fp16", metadata)
    assert estimate.parameters == actual_numbers
    assert_close(estimate.file_bytes, actual_bytes)
