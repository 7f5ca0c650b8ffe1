"""Training images as VAE latents, computed once when the recipe allows it.

Every random choice about an image (which bucket, which background, flipped or not) is
made by the training loop, so this module only turns a fixed description of an image
variant into a latent. With `cache_latents` each variant is encoded once before the
first step and reused every epoch; without it each batch is loaded and encoded when it
is used, optionally by data-loader worker processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from meebs.dataset import load_image


@dataclass(frozen=True)
class Variant:
    """One way an image is shown to the model."""

    path: Path
    size: tuple[int, int]  # bucket (width, height)
    background: str
    flip: bool


def load_pixels(variant: Variant) -> torch.Tensor:
    pixels = load_image(variant.path, variant.size, variant.background)
    return pixels.flip(-1) if variant.flip else pixels


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample latents from the VAE posterior with our own generator, scaled for the UNet."""
    pixels = pixels.to(vae.device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
    return (dist.mean + dist.std * noise) * vae.config.scaling_factor


class _PixelBatches(Dataset):
    """Each item is a whole batch: the loop decides batches, workers only read files."""

    def __init__(self, batches: list[list[Variant]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.stack([load_pixels(v) for v in self.batches[index]])


def pixel_batches(batches: list[list[Variant]], num_workers: int) -> Iterable[torch.Tensor]:
    """Pixel tensors for each batch, in order, read by `num_workers` worker processes."""
    # its own generator: the loader draws a worker seed, which must not come from (and
    # shift) the global RNG that network dropout uses
    return DataLoader(
        _PixelBatches(batches),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )


class LatentCache:
    """Latents of image variants, encoded once. Keyed by the variant, so a change of
    bucket, background or flip is a different entry."""

    def __init__(self, vae, generator: torch.Generator, batch_size: int):
        self.vae, self.generator, self.batch_size = vae, generator, batch_size
        self.latents: dict[Variant, torch.Tensor] = {}

    def fill(self, variants: Iterable[Variant]) -> Iterator[int]:
        """Encode every missing variant; yields the number done so far (for a progress bar)."""
        todo = sorted(set(variants) - self.latents.keys(), key=_variant_key)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            by_size: dict[tuple[int, int], list[Variant]] = {}
            for variant in chunk:
                by_size.setdefault(variant.size, []).append(variant)
            for group in by_size.values():
                pixels = torch.stack([load_pixels(v) for v in group])
                latents = encode(self.vae, pixels, self.generator).cpu()
                self.latents.update(zip(group, latents, strict=True))
            yield start + len(chunk)

    def batch(self, variants: list[Variant]) -> torch.Tensor:
        return torch.stack([self.latents[v] for v in variants])


def _variant_key(variant: Variant) -> tuple:
    return (str(variant.path), variant.size, variant.background, variant.flip)
