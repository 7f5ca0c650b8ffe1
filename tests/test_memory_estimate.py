"""`plan`'s memory figures: the caches counted exactly, peak VRAM against measurements."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from meebs.data.folders import epoch_samples
from meebs.plan.memory import OPTIMIZER_STATE, estimate_memory
from meebs.plan.steps import scan_data
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import OPTIMIZERS
from meebs.training.stop import StopFlag
from meebs.training.train import prepare

REPO = Path(__file__).resolve().parent.parent

# Peak CUDA memory (torch.cuda.max_memory_allocated, GiB) measured by ci/gpu_bench.sh on an
# NVIDIA H200 (torch 2.11, CUDA 13): SD 1.5 architecture, the 1.3 recipe's settings
# (fp16, AdamW8bit, text encoder trained), batch 2, 15 steps, with the `fast` layer (then
# the default; `FAST` below pins it) unless the case names another.
MEASURED = {
    "512 px": (["data.resolution=512"], 6.532),
    "256 px": (["data.resolution=256"], 4.768),
    "512 px, gradient checkpointing": (
        ["data.resolution=512", "train.gradient_checkpointing=true"],
        3.396,
    ),
    "256 px, gradient checkpointing": (
        ["data.resolution=256", "train.gradient_checkpointing=true"],
        3.249,
    ),
    "512 px, low-memory layer": (["data.resolution=512", "train.loha_layer=low-memory"], 4.741),
    "512 px, torch AdamW": (["data.resolution=512", "train.optimizer=AdamW"], 6.570),
    "512 px, lycoris' layer": (["data.resolution=512", "train.loha_layer=lycoris"], 6.861),
}
FAST = "train.loha_layer=fast"
SD15 = [
    "model.path=null",
    "model.sha256=null",
    "model.builtin=sd15-random",
    "train.mixed_precision=fp16",
    "validation.enabled=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MEASURED))
def test_peak_vram_estimate_is_within_5_percent_of_the_measurement(case: str) -> None:
    overrides, measured = MEASURED[case]
    recipe = load_recipe(REPO / "recipes/1.3.yaml", [*SD15, FAST, *overrides])
    estimate = estimate_memory(recipe, scan_data(recipe))
    assert estimate.peak_gib == pytest.approx(measured, rel=0.05)


def test_latent_cache_size_is_what_the_trainer_holds(tmp_path: Path) -> None:
    recipe = load_recipe(
        REPO / "recipes/demo.yaml",
        [f"output.dir={tmp_path}", "validation.enabled=false", "data.flip_aug=true"],
    )
    loop = prepare(recipe, Console(quiet=True))
    loop.data.cache_latents(epoch_samples(loop.scan), Console(quiet=True), StopFlag())
    held = sum(t.numel() * t.element_size() for t in loop.latent_cache.latents.values())
    estimate = estimate_memory(recipe, loop.scan)
    assert estimate.latent_cache_bytes == held > 0
    assert estimate.text_cache_bytes == 0  # the demo trains its text encoder: no cache


def test_plan_prints_the_estimate(capsys) -> None:
    from meebs.cli import main

    assert main(["plan", "recipes/1.3.yaml", *SD15]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Cached: latents" in out and "Peak VRAM on a CUDA GPU, estimated" in out


def test_plan_shows_the_layer_paths_and_keeps_no_weight_for_factored_layers(capsys) -> None:
    """1.3's ranks (4: r1*r2 = 16) against SD 1.5's layers: the factored path takes
    almost every layer, and the estimate keeps a full-size weight only for the others."""
    from meebs.cli import main

    estimates = {}
    for path in ("fast", "factored"):
        overrides = [*SD15, f"train.loha_layer={path}"]
        assert main(["plan", "recipes/1.3.yaml", *overrides]) == 0
        recipe = load_recipe(REPO / "recipes/1.3.yaml", overrides)
        estimates[path] = estimate_memory(recipe, scan_data(recipe)).layer_gib
    out = " ".join(capsys.readouterr().out.split())
    assert "LoHA layers (train.loha_layer=fast): fast on 354" in out
    factored = out.split("LoHA layers (train.loha_layer=factored): factored on ")[1]
    taken, rest = factored.split(", fast on ")
    assert int(taken) + int(rest.split()[0]) == 354 and int(taken) > 300
    assert 0 < estimates["factored"] < 0.05 * estimates["fast"]


def test_every_optimizer_has_a_state_size() -> None:
    """A new optimizer in the schema must say how much state it keeps, or `plan` fails."""
    assert set(OPTIMIZER_STATE) == set(OPTIMIZERS)
