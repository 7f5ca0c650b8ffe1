"""The planned file size against files really written by `save_network`.

The estimate builds the network on weightless modules from the shipped configs; here the
reference networks are built on real modules (the tiny built-in, and the full SD 1.5
from the `sd15_random_parts` fixture, made from REFERENCE's config, not our files) and
saved, and the sizes must agree within 0.1 %.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from meebs.errors import RecipeError
from meebs.models.builtin_models import build_tiny
from meebs.network.build import build_network
from meebs.network.save import save_network
from meebs.plan.metadata import build_metadata, network_spec
from meebs.plan.report import print_plan
from meebs.plan.sizes import (
    describe_sizes,
    empty_model,
    network_shapes,
    plan_file_sizes,
    planned_facts,
    safetensors_size,
)
from meebs.plan.steps import make_plan, scan_data
from meebs.recipe.loading import load_recipe, recipe_from_dict
from meebs.recipe.schema import Recipe
from meebs.training.train import prepare

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
    """The whole `plan` path: the file a run writes with the real base model's hashes."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO, ["model.builtin=tiny"])  # the model built below
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    model = build_tiny()
    facts = planned_facts(recipe, empty_model(recipe))
    facts = replace(facts, base_name=model.name, base_sha256=model.sha256)
    *_, final = plan_file_sizes(recipe, scan, plan)
    metadata = build_metadata(recipe, scan, plan, facts, epoch=plan.epochs, step=plan.total_steps)
    metadata["meebs_recommended_epoch"] = str(plan.epochs)  # validation names an epoch
    actual_bytes, _ = saved_size(tmp_path, recipe, model.unet, model.text_encoder, metadata)
    assert final.least.file_bytes <= actual_bytes <= final.most.file_bytes


def test_planned_facts_are_the_runs_own_fallbacks_included(monkeypatch):
    """Precision, attention and optimizer fall back on a machine without CUDA, xformers
    or bitsandbytes, and each note goes into the header: `plan` asks the trainer's own
    functions, so the planned notes are the run's, character for character."""
    monkeypatch.chdir(ROOT)
    asks = ["train.mixed_precision=fp16", "train.attention=xformers", "train.optimizer=AdamW8bit"]
    recipe = load_recipe(DEMO, ["model.builtin=tiny", *asks])
    run = prepare(recipe, Console(quiet=True)).facts
    planned = planned_facts(recipe, empty_model(recipe))
    assert (planned.mixed_precision, planned.attention, planned.optimizer) == (
        run.mixed_precision,
        run.attention,
        run.optimizer,
    )
    assert planned.fallbacks == run.fallbacks
    if not torch.cuda.is_available():
        assert planned.fallbacks, "fp16 without CUDA falls back, and says so"


def test_bad_optimizer_args_stop_the_plan_with_one_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO, ["model.builtin=tiny", "train.optimizer_args={nope: 1}"])
    with pytest.raises(RecipeError, match=r"^train\.optimizer_args: AdamW refuses them \("):
        planned_facts(recipe, empty_model(recipe))


def test_plan_prints_every_files_size(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO)
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    console = Console(record=True, width=200)
    print_plan(recipe, scan, plan, console)
    text = console.export_text()
    files = plan_file_sizes(recipe, scan, plan)
    assert [file.name for file in files] == [name for _, name in plan.files]
    rows = {
        line.split("│")[2].strip(): line for line in text.splitlines() if ".safetensors" in line
    }
    for file in files:
        assert f" {file.size_text()} │" in rows[file.name]
    assert f"Each network file: {describe_sizes(files)}" in text


def test_a_validated_runs_final_file_is_a_range_where_the_epoch_may_take_more_digits(
    monkeypatch,
):
    """The run decides the recommended epoch: of epochs 1 to 12, one or two digits."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO, ["model.builtin=tiny", "train.epochs=12", "output.name=n"])
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    facts = planned_facts(recipe, empty_model(recipe))
    shapes = network_shapes(recipe)
    sizes = set()
    for recommended in (1, 12):
        metadata = build_metadata(recipe, scan, plan, facts, epoch=12, step=plan.total_steps)
        metadata["meebs_recommended_epoch"] = str(recommended)
        sizes.add(safetensors_size(shapes, "fp16", metadata).file_bytes)
    final = plan_file_sizes(recipe, scan, plan)[-1]
    assert len(sizes) == 2, "the example needs the two lengths in different 8-byte paddings"
    assert (final.least.file_bytes, final.most.file_bytes) == (min(sizes), max(sizes))


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


# Every algorithm, built with lycoris' own network class (as the trainer builds it), with
# the tensors only that algorithm's file holds (issue 21).
ALGO_NETWORKS = {
    "lokr": {},
    "lokr-both": {"decompose_both": True, "factor": 4},
    "lokr-full": {"full_matrix": True},
    "lokr-tucker": {"use_tucker": True},
    "glora": {},
    "diag-oft": {"constraint": 1e-3, "rescaled": True},
    "full": {},
    "ia3": {},
    "lora-dora": {"weight_decompose": True},
    "loha-dora": {"weight_decompose": True, "wd_on_out": False},
    "lokr-dora": {"weight_decompose": True},
    "loha-scalar": {"use_scalar": True},
}


def lycoris_network(unet, text_encoder, name: str):
    """lycoris' kohya network of algo `name` on both parts, hooked in like the trainer's."""
    from lycoris.kohya import LycorisNetworkKohya

    from meebs.network.build import apply_sd15_preset, lycoris_text_encoder

    apply_sd15_preset()  # GLoRA narrows lycoris' class-level targets: reset them
    wrapped = lycoris_text_encoder(text_encoder)
    network = LycorisNetworkKohya(
        wrapped,
        unet,
        lora_dim=4,
        alpha=1,
        conv_lora_dim=4,
        conv_alpha=1,
        network_module="diag-oft" if name == "diag-oft" else name.split("-")[0],
        **ALGO_NETWORKS[name],
    )
    network.apply_to(wrapped, unet, apply_text_encoder=True, apply_unet=True)
    return network


@pytest.mark.parametrize("name", list(ALGO_NETWORKS))
def test_each_algos_file_size_is_estimated_from_weightless_modules(tmp_path, name):
    """The plan's way (no weights: `_WeightlessCopies` where lycoris copies the base
    weight) against the file `save_network` writes from the real tiny base."""
    import json

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from meebs.models.base import TINY_CONFIGS
    from meebs.plan.sizes import _WeightlessCopies

    model = build_tiny()
    torch.manual_seed(0)
    network = lycoris_network(model.unet, model.text_encoder, name)
    path = tmp_path / "net.safetensors"
    metadata = {"ss_output_name": "n"}
    save_network(network, path, metadata, torch.float16)
    numbers = sum(value.numel() for value in network.state_dict().values())

    def config(part: str) -> dict:
        return json.loads((TINY_CONFIGS / part / "config.json").read_text(encoding="utf-8"))

    with torch.random.fork_rng(), init_empty_weights():
        unet = UNet2DConditionModel.from_config(config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
        with _WeightlessCopies():
            weightless = lycoris_network(unet, text_encoder, name)
    with _WeightlessCopies():
        shapes = {key: tuple(value.shape) for key, value in weightless.state_dict().items()}
    estimate = safetensors_size(shapes, "fp16", metadata)
    assert estimate.parameters == numbers
    assert_close(estimate.file_bytes, path.stat().st_size)


@pytest.mark.parametrize(
    "network",
    [
        {"algo": "lokr", "dim": 2, "factor": 4, "decompose_both": True},
        {"algo": "glora", "dim": 2},
        {"algo": "diag-oft", "dim": 4, "constraint": 0.01, "rescaled": True},
        {"algo": "full"},
        {"algo": "ia3"},
        {"algo": "loha", "dora_wd": True},
        {"algo": "lokr", "dora_wd": True, "use_tucker": True},
    ],
)
def test_plans_estimate_of_each_algos_file(tmp_path, network):
    """`network_shapes(recipe)`, the plan's path (the recipe's network on weightless
    modules), against the file the trainer's own `build_network` + `save_network` write."""
    recipe = recipe_with({"builtin": "tiny"}, network)
    metadata = {"ss_output_name": "n"}
    model = build_tiny()
    actual_bytes, actual_numbers = saved_size(
        tmp_path, recipe, model.unet, model.text_encoder, metadata
    )
    estimate = safetensors_size(network_shapes(recipe), "fp16", metadata)
    assert estimate.parameters == actual_numbers
    assert_close(estimate.file_bytes, actual_bytes)
