"""Training images as VAE latents, computed once when the recipe allows it.

Every random choice about an image (which bucket, which background, flipped or not) is
made by the training loop, so this module only turns a fixed description of an image
variant into a latent. With `cache_latents` each variant is encoded once before the
first step and reused every epoch (and with `cache_latents_to_disk`, by later runs too);
without it each batch is loaded and encoded when it is used, optionally by data-loader
worker processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset

from meebs.data.images import load_image
from meebs.errors import MeebsError
from meebs.files.atomic_write import make_folder, remove_temps
from meebs.files.hash_cache import cache_file
from meebs.files.safetensors_io import save_file_atomic

# Bump when preprocessing or encoding changes: every cached latent is then a miss.
LATENT_FORMAT = 1
STALE_TEMP_S = 3600  # an entry is written in milliseconds


def latent_shape(vae_config, width: int, height: int) -> tuple[int, int, int]:
    """(channels, height, width) of one image's latent. Each VAE block after the first halves
    the size: 8x for SD 1.5's four blocks, 4x for tiny-trained's three."""
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    return vae_config.latent_channels, height // scale, width // scale


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
    """Latents of image variants, each encoded once, in memory and optionally on disk.

    An entry is addressed by its content: the image file's sha256, the variant (bucket,
    background, flip), the base model's sha256 and the run's seed. The latent is sampled
    from the VAE posterior with noise seeded by that address and the image is encoded on
    its own (a batch's composition can change a convolution's low bits), so a latent is
    a pure function of its address: reading it from the disk cache of an earlier run gives
    exactly the bytes encoding it again would, and any change to the image, the model or
    the preprocessing is a new address. A corrupt or mismatched file is re-encoded.
    """

    def __init__(
        self,
        vae,
        model_sha256: str,
        seed: int,
        store: Path | None,
        image_sha256: Mapping[Path, str],
    ):
        self.vae, self.model_sha256, self.seed, self.store = vae, model_sha256, seed, store
        self.image_sha256 = image_sha256
        self.latents: dict[Variant, torch.Tensor] = {}
        self.device = next(vae.parameters()).device
        self.encoded = self.reused = 0
        self.warnings: list[str] = []
        if store is not None and store.is_dir():
            self._remove_stale_temps(store)

    @staticmethod
    def _remove_stale_temps(store: Path) -> None:
        """Temp files of processes killed while writing an entry. They are never read (an
        entry is renamed to its address only when whole); a young one may be another
        live run's, so only those older than any write could take are removed."""
        for folder in store.iterdir():
            remove_temps(folder, older_than_s=STALE_TEMP_S)

    def fill(self, variants: Iterable[Variant]) -> Iterator[int]:
        """Load or encode every missing variant; yields the number done (a progress bar)."""
        todo = sorted(set(variants) - self.latents.keys(), key=_variant_key)
        for done, variant in enumerate(todo, start=1):
            address = self.address(variant)
            latent = self._read(address, variant)
            if latent is None:
                noise = torch.Generator().manual_seed(int(address[:15], 16))
                latent = encode(self.vae, load_pixels(variant)[None], noise)[0].cpu()
                self._write(address, latent)
                self.encoded += 1
            else:
                self.reused += 1
            self.latents[variant] = latent.to(self.device)  # read in the step, never moved
            yield done

    def batch(self, variants: list[Variant]) -> torch.Tensor:
        return torch.stack([self.latents[v] for v in variants])

    def address(self, variant: Variant) -> str:
        content = {
            "format": LATENT_FORMAT,
            "image_sha256": self.image_sha256[variant.path],
            "size": list(variant.size),
            "background": variant.background,
            "flip": variant.flip,
            "model_sha256": self.model_sha256,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def _file(self, address: str) -> Path | None:
        return self.store / address[:2] / f"{address}.safetensors" if self.store else None

    def _read(self, address: str, variant: Variant) -> torch.Tensor | None:
        file = self._file(address)
        if file is None or not file.is_file():
            return None
        width, height = variant.size
        try:
            with safe_open(str(file), "pt") as f:
                latent = f.get_tensor("latent")
                stored = f.metadata().get("address")
        except (OSError, SafetensorError, KeyError, ValueError):
            stored, latent = None, None
        expected = latent_shape(self.vae.config, width, height)
        if stored != address or latent is None or tuple(latent.shape) != expected:
            self.warnings.append(f"{file}: corrupt latent cache entry, encoded again")
            return None
        if not torch.isfinite(latent).all():
            self.warnings.append(f"{file}: latent cache entry holds NaN/inf, encoded again")
            return None
        return latent

    def _write(self, address: str, latent: torch.Tensor) -> None:
        """Best effort: a cache that cannot be written only costs time next run."""
        file = self._file(address)
        if file is None:
            return
        try:
            make_folder(file.parent)  # (two processes may make it at once: both succeed)
            save_file_atomic(
                {"latent": latent.contiguous()}, file, {"address": address}, overwrite=True
            )
        except (OSError, MeebsError) as exc:
            self.warnings.append(f"latent cache not written ({exc}); encoding again next run")


def latent_store() -> Path:
    """Where cached latents live: beside the verified-hash cache ($MEEBS_CACHE_DIR)."""
    return cache_file().parent / "latents"


def _variant_key(variant: Variant) -> tuple:
    return (str(variant.path), variant.size, variant.background, variant.flip)
