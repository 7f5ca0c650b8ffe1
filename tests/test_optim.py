"""Optimizers and LR schedules named by the recipe, including the fallbacks."""

from pathlib import Path

import pytest
import torch

from meebs.network.optim import build_lr_scheduler, build_optimizer
from meebs.recipe.loading import load_recipe

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


def groups() -> list[dict]:
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(64, 64))], "lr": 1e-3, "name": "unet"}]


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Prodigy"])
def test_each_optimizer_takes_a_step(name):
    recipe = load_recipe(DEMO, [f"train.optimizer={name}"])
    params = groups()
    before = params[0]["params"][0].detach().clone()
    optimizer, used, notes = build_optimizer(params, recipe)
    params[0]["params"][0].sum().backward()
    optimizer.step()
    assert used == name
    assert not torch.equal(before, params[0]["params"][0].detach())
    if name == "AdamW8bit":  # on this CPU-only machine, said once, recorded in the file
        assert notes == ["AdamW8bit on CPU: using bitsandbytes' CPU implementation"]


def test_missing_bitsandbytes_falls_back_to_adamw(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    recipe = load_recipe(DEMO, ["train.optimizer=AdamW8bit"])
    optimizer, used, notes = build_optimizer(groups(), recipe)
    assert used == "AdamW" and isinstance(optimizer, torch.optim.AdamW)
    assert "AdamW8bit unavailable" in notes[0]


@pytest.mark.parametrize(
    ("scheduler", "warmup", "expected"),
    [
        ("constant", 0.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", 0.2, [0.0, 0.5, 1.0, 1.0, 1.0]),  # 2 warmup steps of 10
        ("linear", 0.0, [1.0, 0.9, 0.8, 0.7, 0.6]),
        ("cosine", 0.0, [1.0, 0.97553, 0.90451, 0.79389, 0.65451]),
    ],
)
def test_schedules(scheduler, warmup, expected):
    recipe = load_recipe(
        DEMO,
        [f"train.lr_scheduler={scheduler}", f"train.lr_warmup={warmup}", "train.learning_rate=1"],
    )
    params = groups()
    params[0]["lr"] = 1.0
    optimizer, _, _ = build_optimizer(params, recipe)
    total = 10
    schedule = build_lr_scheduler(optimizer, recipe, total, int(warmup * total))
    seen = []
    for _ in range(5):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(expected, abs=1e-5)
