"""Optimizer and learning-rate schedule, with the fallbacks a machine may force.

The recipe names an optimizer; what the machine can run may differ (8-bit AdamW needs
bitsandbytes). Each fallback is returned as a sentence so the run prints it once and
records it in the file's metadata.
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from meebs.recipe.schema import Recipe


def param_groups(network, recipe: Recipe) -> list[dict]:
    """One group per trained part, each with its own LR; a part with LR 0 has no modules."""
    groups = []
    for loras, lr, name in (
        (network.unet_loras, recipe.unet_lr, "unet"),
        (network.text_encoder_loras, recipe.text_encoder_lr, "text_encoder"),
    ):
        params = [p for lora in loras for p in lora.parameters() if p.requires_grad]
        if params and lr > 0:
            groups.append({"params": params, "lr": lr, "name": name})
    return groups


def build_optimizer(groups: list[dict], recipe: Recipe) -> tuple[torch.optim.Optimizer, str, list]:
    """(optimizer, the name actually used, fallback messages)."""
    name, kwargs = recipe.train.optimizer, dict(recipe.train.optimizer_args)
    if name == "AdamW":
        return torch_adamw(groups, kwargs), "AdamW", []
    if name == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **kwargs), "Prodigy", []
    try:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
    except (ImportError, RuntimeError) as exc:
        reason = f"AdamW8bit unavailable ({type(exc).__name__}: {exc}); using torch AdamW"
        return torch_adamw(groups, kwargs), "AdamW", [reason]
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    notes = ["AdamW8bit on CPU: using bitsandbytes' CPU implementation"] if on_cpu else []
    return optimizer, "AdamW8bit", notes


def torch_adamw(groups: list[dict], kwargs: dict) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all tensors, CPU and CUDA) unless the recipe's
    optimizer_args choose an implementation: the per-tensor loop costs a LoHA's ~1400
    small tensors a Python round each."""
    if "foreach" not in kwargs:
        kwargs = {"fused": True, **kwargs}
    return torch.optim.AdamW(groups, **kwargs)


def build_lr_scheduler(optimizer, recipe: Recipe, total_steps: int, warmup_steps: int):
    train = recipe.train
    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=train.lr_scheduler_num_cycles,
        power=train.lr_scheduler_power,
    )
