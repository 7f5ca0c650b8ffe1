"""What this machine gives a recipe: the device and precision (through accelerate), the
attention backend, and where the models live. Training, `plan` (whose size estimate
records the same fallbacks) and the benchmark all ask here, so they always agree.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from meebs.models.base import BaseModel
from meebs.recipe.schema import Recipe


def make_accelerator(recipe: Recipe) -> tuple[Accelerator, list[str]]:
    """accelerate picks the device; half precision without CUDA falls back to fp32."""
    fallbacks = []
    precision = recipe.train.mixed_precision
    if not torch.cuda.is_available() and precision != "no":
        fallbacks.append(f"mixed_precision {precision} needs a CUDA GPU; training in fp32")
        precision = "no"
    # split_batches: each step's batch is split between the processes (`_epoch_plan`), so
    # accelerate must step the LR schedule once per step, not once per process
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    return accelerator, fallbacks


def set_attention(base: BaseModel, recipe: Recipe, fallbacks: list[str]) -> str:
    if recipe.train.attention == "xformers":
        try:
            base.unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except (ImportError, ModuleNotFoundError, NotImplementedError, ValueError) as exc:
            fallbacks.append(f"xformers unavailable ({exc.__class__.__name__}); using SDPA")
    return "sdpa"


def place_models(base: BaseModel, network, accelerator: Accelerator, recipe, train_te: bool):
    """Frozen weights in the compute dtype on the device; the network stays fp32."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    device = accelerator.device
    for part in (base.unet, base.text_encoder):
        part.to(device)
        if weight_dtype != torch.float32:
            part.to(weight_dtype)
    base.vae.to(device)
    network.to(device)
    network.train()
    if recipe.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if train_te:
            base.text_encoder.gradient_checkpointing_enable()
