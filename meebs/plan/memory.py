"""What a run will hold in memory, before it starts: caches and an estimate of peak VRAM.

The caches are counted exactly (latents per image variant, text-encoder outputs per
caption). Peak VRAM is a model: the parts that are plain arithmetic (frozen weights, the
network with its gradients and optimizer state, the full-size weights the LoHA layer
path keeps for the backward) plus activations, which scale with batch x latent pixels
at a rate measured on a GPU and kept here as constants: fitted to four measured runs,
checked against all seven (tests/test_memory_estimate.py). What it does not
count: the CUDA context (~0.5 GiB per process, outside PyTorch's allocator) and
fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from meebs.data.folders import DatasetScan
from meebs.data.latents import latent_shape
from meebs.network.loha_layer import layer_path
from meebs.plan.sizes import EmptyModel, empty_model
from meebs.plan.steps import bucket_assigner
from meebs.recipe.schema import Recipe

GIB = 2**30
# Activations of one training step, in GiB, per sample and latent pixel (slope) and fixed
# (intercept); SD 1.5 on an H200 (torch 2.11, CUDA 13, SDPA, fp16 autocast), fitted to
# batch 2 at 256 and 512 px (ci/gpu_bench.sh, docs/performance.md "Measured").
ACTIVATIONS = {False: (2.87e-4, 0.189), True: (2.39e-5, 0.967)}  # gradient checkpointing?
# Bytes of optimizer state per trained parameter, read from each optimizer's state
# (Adafactor keeps a row and a column per matrix: about nothing for a network's factors).
OPTIMIZER_STATE = {
    "AdamW": 8,
    "AdamW8bit": 2,
    "PagedAdamW8bit": 2,
    "Lion": 4,
    "Lion8bit": 1,
    "PagedLion8bit": 1,
    "SGDNesterov": 4,
    "SGDNesterov8bit": 1,
    "Adafactor": 0,
    "DAdaptation": 12,
    "DAdaptAdam": 12,
    "DAdaptAdaGrad": 12,
    "DAdaptAdan": 20,
    "DAdaptLion": 8,
    "DAdaptSGD": 8,
    "Prodigy": 16,
}
# lycoris' own forward keeps a delta weight and a merged weight per layer: measured 19%
# more than the one effective weight the "fast" path keeps.
LYCORIS_LAYER_FACTOR = 1.19


@dataclass(frozen=True)
class MemoryEstimate:
    latent_cache_bytes: int  # in memory (and about as much on disk with the disk cache)
    text_cache_bytes: int  # 0 when the text encoder is trained (nothing to cache)
    frozen_gib: float  # UNet + text encoder in the compute dtype, VAE in fp32
    network_gib: float  # weights, gradients and optimizer state, fp32
    layer_gib: float  # full-size weights the LoHA layer path keeps for the backward
    activations_gib: float

    @property
    def peak_gib(self) -> float:
        return self.frozen_gib + self.network_gib + self.layer_gib + self.activations_gib

    def describe(self) -> list[str]:
        """Lines for `plan`."""
        return [
            f"Cached: latents {self.latent_cache_bytes / 1e6:.1f} MB"
            + (
                f", text-encoder outputs {self.text_cache_bytes / 1e6:.1f} MB"
                if self.text_cache_bytes
                else ""
            )
            + " (in memory; the latents also on disk with data.cache_latents_to_disk)",
            f"Peak VRAM on a CUDA GPU, estimated: {self.peak_gib:.1f} GiB = frozen weights "
            f"{self.frozen_gib:.2f} + network and optimizer {self.network_gib:.2f} + LoHA "
            f"layer {self.layer_gib:.2f} + activations {self.activations_gib:.2f} "
            "(plus the CUDA context)",
        ]


def estimate_memory(
    recipe: Recipe, scan: DatasetScan, model: EmptyModel | None = None
) -> MemoryEstimate:
    train = recipe.train
    half = train.mixed_precision in ("fp16", "bf16")
    compute_bytes = 2 if half else 4
    model = model or empty_model(recipe)
    frozen = (_count(model.unet) + _count(model.text_encoder)) * compute_bytes
    frozen += _count(model.vae) * 4
    trained = _count(model.network)
    state = 4 + 4 + OPTIMIZER_STATE[train.optimizer]
    layer = _layer_bytes(recipe, model.network.loras) * compute_bytes
    slope, intercept = ACTIVATIONS[train.gradient_checkpointing]
    width, height = recipe.data.resolution
    _, latent_height, latent_width = latent_shape(model.vae.config, width, height)
    pixels = latent_height * latent_width
    activations = intercept + slope * train.batch_size * pixels
    cached = recipe.data.cache_latents
    return MemoryEstimate(
        latent_cache_bytes=_latent_bytes(recipe, scan, model.vae.config) if cached else 0,
        text_cache_bytes=_text_bytes(recipe, scan, model.text_config, compute_bytes),
        frozen_gib=frozen / GIB,
        network_gib=trained * state / GIB,
        layer_gib=layer / GIB,
        activations_gib=activations,
    )


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_bytes(recipe: Recipe, loras) -> float:
    """Numbers of the full-size weights the layer paths keep for the backward: one per
    "fast" layer, 19% more per lycoris one, none for "factored" and "low-memory" ones.
    With checkpointing the blocks' weights are rebuilt in the backward anyway (the
    activations constant holds what stays)."""
    if recipe.network.algo != "loha" or recipe.train.gradient_checkpointing:
        return 0.0
    kept = {"fast": 1.0, "lycoris": LYCORIS_LAYER_FACTOR}
    return sum(
        lora.org_module[0].weight.numel() * kept.get(layer_path(lora, recipe.train.loha_layer), 0.0)
        for lora in loras
    )


def _latent_bytes(recipe: Recipe, scan: DatasetScan, vae_config) -> int:
    """fp32 latents of every image variant: each image's bucket, flipped or not."""
    bucket = bucket_assigner(recipe)

    def latent(image) -> int:
        return 4 * math.prod(latent_shape(vae_config, *bucket(image)))

    flips = 2 if recipe.data.flip_aug else 1  # validation images are never flipped
    return flips * sum(map(latent, scan.unique_images)) + sum(map(latent, scan.held_out))


def _text_bytes(recipe: Recipe, scan: DatasetScan, text_config: dict, compute_bytes: int) -> int:
    """Hidden states per distinct caption while the text encoder is frozen (captions
    shuffled or dropped at random make more distinct ones: this counts the files')."""
    if recipe.text_encoder_lr > 0:
        return 0
    captions = {im.caption for im in scan.unique_images}
    tokens = recipe.train.max_token_length + 2
    return len(captions) * tokens * text_config["hidden_size"] * compute_bytes
