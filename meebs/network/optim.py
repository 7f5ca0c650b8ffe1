"""Optimizer and learning-rate schedule, with the fallbacks a machine may force.

The recipe names an optimizer by kohya sd-scripts' name (`train.optimizer`, schema
OPTIMIZERS) and `train.optimizer_args` are its keyword arguments, as kohya_ss passes
them; each name maps to the class kohya's `get_optimizer` builds, with kohya's defaults.
What the machine can run may differ (the 8-bit and paged optimizers need bitsandbytes,
paging needs CUDA). Each fallback is returned as a sentence so the run prints it once and
records it in the file's metadata. docs/recipes.md "Optimizers" lists them all.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler

from meebs.errors import RecipeError
from meebs.recipe.schema import Recipe

# The D-Adaptation classes (package `dadaptation`) by kohya's names. kohya's "DAdaptation"
# is the preprint's Adam (experimental.DAdaptAdamPreprint), not DAdaptAdam.
DADAPTATION = {
    "DAdaptation": "experimental.DAdaptAdamPreprint",
    "DAdaptAdam": "DAdaptAdam",
    "DAdaptAdaGrad": "DAdaptAdaGrad",
    "DAdaptAdan": "DAdaptAdan",
    "DAdaptLion": "DAdaptLion",
    "DAdaptSGD": "DAdaptSGD",
}
# Those that refuse, at their first step, parameter groups with different LRs.
ONE_LR = {"DAdaptation", "DAdaptAdam", "DAdaptLion", "DAdaptSGD", "Prodigy"}
# bitsandbytes' optimizers: kohya's name -> (bitsandbytes class, the non-paged class that
# does the same math without CUDA's paged memory, the 32-bit optimizer without bnb).
BITSANDBYTES = {
    "AdamW8bit": ("AdamW8bit", "AdamW8bit", "AdamW"),
    "PagedAdamW8bit": ("PagedAdamW8bit", "AdamW8bit", "AdamW"),
    "Lion8bit": ("Lion8bit", "Lion8bit", "Lion"),
    "PagedLion8bit": ("PagedLion8bit", "Lion8bit", "Lion"),
    "SGDNesterov8bit": ("SGD8bit", "SGD8bit", "SGDNesterov"),
}
SHOWN_32BIT = {"AdamW": "torch AdamW", "Lion": "lion-pytorch's Lion", "SGDNesterov": "torch SGD"}
# kohya's momentum when SGDNesterov(8bit) is given none (Nesterov needs one).
SGD_MOMENTUM = 0.9


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
    if name in ONE_LR:
        _one_lr(name, recipe)
    if name == "AdamW":
        return torch_adamw(groups, kwargs), "AdamW", []
    if name in BITSANDBYTES:
        return _bitsandbytes(name, groups, kwargs, recipe)
    lr = _default_lr(recipe)
    if name == "Lion":
        return _lion(groups, lr, kwargs), name, []
    if name == "SGDNesterov":
        return _sgd_nesterov(groups, lr, kwargs), name, []
    if name == "Adafactor":
        return _adafactor(groups, lr, kwargs, recipe)
    if name == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **kwargs), "Prodigy", []
    if name in DADAPTATION:
        import dadaptation
        import dadaptation.experimental  # DAdaptation's class lives there

        cls: Any = dadaptation
        for part in DADAPTATION[name].split("."):
            cls = getattr(cls, part)
        return cls(groups, lr=lr, **kwargs), name, []
    raise RecipeError(f"train.optimizer: {name} is not built by this version of sd-meebs")


def _default_lr(recipe: Recipe) -> float:
    """The LR kohya passes to the constructor (groups without their own LR take it)."""
    return recipe.train.learning_rate or recipe.unet_lr or recipe.text_encoder_lr


def _one_lr(name: str, recipe: Recipe) -> None:
    """D-Adaptation and Prodigy adapt one step size for all groups and stop at their first
    step on groups with different LRs: say so before anything is loaded."""
    unet, te = recipe.unet_lr, recipe.text_encoder_lr
    if unet > 0 and te > 0 and unet != te:
        raise RecipeError(
            f"train.optimizer: {name} takes one LR for all it trains, but unet_lr is {unet:g} "
            f"and text_encoder_lr {te:g}; give them the same value (kohya_ss users write "
            "1.0) or set text_encoder_lr to 0"
        )


def torch_adamw(groups: list[dict], kwargs: dict) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all tensors, CPU and CUDA) unless the recipe's
    optimizer_args choose an implementation: the per-tensor loop costs a LoHA's ~1400
    small tensors a Python round each."""
    if "foreach" not in kwargs:
        kwargs = {"fused": True, **kwargs}
    return torch.optim.AdamW(groups, **kwargs)


def _lion(groups: list[dict], lr: float, kwargs: dict) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    try:
        return Lion(groups, lr=lr, **kwargs)
    except AssertionError:  # lion-pytorch checks its arguments with assert
        raise ValueError("Lion needs lr > 0 and betas in [0, 1]") from None


def _sgd_nesterov(groups: list[dict], lr: float, kwargs: dict) -> torch.optim.SGD:
    kwargs = {"momentum": SGD_MOMENTUM, **kwargs}
    return torch.optim.SGD(groups, lr=lr, nesterov=True, **kwargs)


def _bitsandbytes(name: str, groups: list[dict], kwargs: dict, recipe: Recipe):
    """An 8-bit optimizer of bitsandbytes; on a CPU its CPU implementation (and the
    non-paged class: paging is CUDA memory), without bitsandbytes the 32-bit optimizer."""
    paged, plain, fallback = BITSANDBYTES[name]
    on_cuda = bool(groups) and all(p.device.type == "cuda" for g in groups for p in g["params"])
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    cls_name = paged if on_cuda else plain
    lr = _default_lr(recipe)
    try:
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, cls_name)
        if name == "SGDNesterov8bit":
            # as kohya: momentum 0.9 unless given, and nesterov=True, which bitsandbytes'
            # SGD8bit accepts and does not use (its update is SGD with momentum)
            kwargs = {"momentum": SGD_MOMENTUM, **kwargs}
            optimizer = cls(groups, lr=lr, nesterov=True, **kwargs)
        else:
            optimizer = cls(groups, lr=lr, **kwargs)
    except NotImplementedError as exc:  # SGD8bit: "SGD without momentum is not supported!"
        raise ValueError(str(exc)) from None
    except (ImportError, RuntimeError, AttributeError) as exc:
        shown = SHOWN_32BIT[fallback]
        reason = f"{name} unavailable ({type(exc).__name__}: {exc}); using {shown}"
        if fallback == "AdamW":
            return torch_adamw(groups, kwargs), fallback, [reason]
        if fallback == "Lion":
            return _lion(groups, lr, kwargs), fallback, [reason]
        return _sgd_nesterov(groups, lr, kwargs), fallback, [reason]
    used = name if cls_name == paged else plain
    if not on_cpu:
        notes = [] if used == name else [f"{name} off CUDA: using {used} (paging needs CUDA)"]
    elif used == name:
        notes = [f"{name} on CPU: using bitsandbytes' CPU implementation"]
    else:
        notes = [f"{name} on CPU: using bitsandbytes' {used} CPU implementation (not paged)"]
    return optimizer, used, notes


def _adafactor(groups: list[dict], lr: float, kwargs: dict, recipe: Recipe):
    """transformers' Adafactor as kohya sets it up: relative_step is on unless the args
    turn it off (and warmup_init turns it back on); with it Adafactor computes its own LR,
    so the groups' LRs, the recipe's LR and its schedule are not used."""
    from transformers.optimization import Adafactor

    kwargs = {"relative_step": True, **kwargs}
    if kwargs.get("warmup_init"):
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return Adafactor(groups, lr=lr, **kwargs), "Adafactor", []
    groups = [{k: v for k, v in group.items() if k != "lr"} for group in groups]
    optimizer = Adafactor(groups, lr=None, **kwargs)
    note = (
        "Adafactor with relative_step (kohya's default; optimizer_args relative_step=False "
        "turns it off): Adafactor sets its own LR, so train.learning_rate, unet_lr, "
        f"text_encoder_lr and lr_scheduler {recipe.train.lr_scheduler} are not used"
    )
    return optimizer, "Adafactor", [note]


def build_lr_scheduler(optimizer, recipe: Recipe, total_steps: int, warmup_steps: int):
    train = recipe.train
    if getattr(optimizer, "defaults", {}).get("relative_step"):  # Adafactor's own LR
        return adafactor_schedule(optimizer, train.learning_rate)
    return get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=train.lr_scheduler_num_cycles,
        power=train.lr_scheduler_power,
    )


def adafactor_schedule(optimizer, initial_lr: float):
    """transformers' AdafactorSchedule (kohya's "adafactor" scheduler, which kohya puts in
    place of any other with relative_step): `initial_lr` until the first step, then the
    LR Adafactor computed, as a Python float (Adafactor's is a tensor, which the groups
    would keep)."""
    from transformers.optimization import AdafactorSchedule

    class FloatAdafactorSchedule(AdafactorSchedule):
        def get_lr(self):
            return [float(lr) for lr in super().get_lr()]

    return FloatAdafactorSchedule(optimizer, initial_lr)
