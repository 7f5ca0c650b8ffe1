"""Validation: is the network still learning the subject, and is it forgetting the class?

Two numbers per evaluation, both deterministic (the same weights give the same values,
to the bit, and evaluating never moves a random stream training uses):

- subject loss: the denoising MSE on the held-out subject images, with the network on;
- class drift: on a fixed subset of the reg (class) images, the network's MSE minus the
  base model's MSE (the network at multiplier 0) on the same noise and timesteps. Above
  0 the network makes the class worse; an untrained network gives exactly 0.

Each image is noised at `timesteps` fixed noise levels spread evenly over the schedule,
with noise drawn from its own generator, seeded from the split seed and the image's
sha256. Both values are also given per band of noise level (low / mid / high: thirds of
the timesteps). The recommended epoch is the saved epoch with the lowest subject loss
whose class drift stays within `drift_tolerance` x the base model's class loss.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from meebs.data import latents as latent_io
from meebs.data.batches import process_caption
from meebs.data.folders import ImageItem
from meebs.data.images import background_for
from meebs.files.hash_cache import cached_sha256

BANDS = ("low", "mid", "high")
RESULT_NAME = "validation.json"
# The most latent pixels one validation forward holds: one 512 px SD 1.5 image at 8
# timesteps, what a forward held when each image had its own. A small model's images then
# share forwards (the demo's seven in one): its validation took 30% less time (3.5 s -> 2.5 s).
FORWARD_LATENT_PIXELS = 8 * 64 * 64


def spread_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """`count` timesteps at the middles of equal slices of the schedule."""
    return [
        min(num_train_timesteps - 1, int((i + 0.5) * num_train_timesteps / count))
        for i in range(count)
    ]


def bands(values: torch.Tensor) -> dict[str, float]:
    """Mean per band of noise level (timesteps in ascending order, split in thirds)."""
    parts = np.array_split(np.arange(len(values)), len(BANDS))
    return {name: float(values[idx].mean()) for name, idx in zip(BANDS, parts, strict=True)}


def class_subset(reg: list[ImageItem], count: int) -> list[ImageItem]:
    """A fixed subset of the reg images: evenly spaced in scan order."""
    if len(reg) <= count:
        return list(reg)
    return [reg[int(i * len(reg) / count)] for i in range(count)]


@dataclass
class Evaluation:
    epoch: int
    step: int
    subject_loss: float
    subject_bands: dict[str, float]
    class_drift: float | None
    class_drift_bands: dict[str, float] | None
    base_class_loss: float | None
    seconds: float


class Validator:
    """Scores the loop's network on the held-out and class images; `evaluate` per epoch."""

    def __init__(self, loop, console: Console):
        self.loop = loop
        recipe = loop.recipe
        self.settings = recipe.validation
        self.subject = list(loop.scan.held_out)
        reg = [im for subset in loop.scan.reg for im in subset.images]
        self.classes = class_subset(reg, self.settings.class_images)
        steps = loop.base.noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.tensor(spread_timesteps(self.settings.timesteps, steps))
        self.evaluations: list[Evaluation] = []
        self.seconds = 0.0
        self._base: torch.Tensor | None = None  # base model class losses, once
        mode = recipe.data.background
        images = self.subject + self.classes
        for image in self.subject:
            loop.image_sha256.setdefault(image.path, cached_sha256(image.path))
        self.variants = {}
        for image in images:
            # held-out images have no place in the training order; reg images keep theirs
            background = loop.data.backgrounds.get(image.path) or background_for(
                self.subject.index(image), mode
            )
            bucket = loop.data.assign_bucket(image)
            self.variants[image.path] = latent_io.Variant(image.path, bucket, background, False)
        for _ in loop.latent_cache.fill(self.variants.values()):
            pass
        self.noise = {image.path: self._fixed_noise(image) for image in images}
        self.captions = {image.path: self._caption(image) for image in images}

    def _fixed_noise(self, image: ImageItem) -> torch.Tensor:
        key = f"{self.settings.seed}/{self.loop.image_sha256[image.path]}"
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
        shape = (
            len(self.timesteps),
            *self.loop.latent_cache.latents[self.variants[image.path]].shape,
        )
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def _caption(self, image: ImageItem) -> str:
        """As training processes it, without its randomness (no shuffle, no dropout)."""
        keep = self.loop.recipe.data.keep_tokens
        return process_caption(
            image.caption, shuffle=False, keep_tokens=keep, dropout_rate=0.0, rng=random.Random(0)
        )

    def _losses(self, images: list[ImageItem]) -> torch.Tensor:
        """Per-timestep MSE of the UNet (as the network is set now) on images of one size,
        in one forward: (images, timesteps)."""
        loop = self.loop
        device = loop.accelerator.device
        count = len(self.timesteps)
        variants = [self.variants[image.path] for image in images]
        latents = loop.latent_cache.batch(variants).repeat_interleave(count, dim=0)
        noise = torch.cat([self.noise[image.path] for image in images]).to(device)
        captions = [self.captions[image.path] for image in images]
        hidden = loop.math.encode_text(captions).repeat_interleave(count, dim=0)
        timesteps = self.timesteps.to(device).repeat(len(images))
        losses = loop.math.denoising_losses(latents.to(device), noise, timesteps, hidden)
        return losses.cpu().view(len(images), count)

    def _forwards(self, images: list[ImageItem]) -> Iterator[list[ImageItem]]:
        """The images grouped by latent size, at most FORWARD_LATENT_PIXELS per group."""
        by_size: dict[tuple[int, int], list[ImageItem]] = {}
        for image in images:
            by_size.setdefault(self.variants[image.path].size, []).append(image)
        for group in by_size.values():
            latent = self.loop.latent_cache.latents[self.variants[group[0].path]]
            per_image = len(self.timesteps) * latent.shape[-2] * latent.shape[-1]
            size = max(1, FORWARD_LATENT_PIXELS // per_image)
            for start in range(0, len(group), size):
                yield group[start : start + size]

    def _per_image(self, images: list[ImageItem]) -> dict[Path, torch.Tensor]:
        """Each image's per-timestep MSE, in as few forwards as the pixel budget allows."""
        losses: dict[Path, torch.Tensor] = {}
        for group in self._forwards(images):
            losses.update(zip([image.path for image in group], self._losses(group), strict=True))
        return losses

    @staticmethod
    def _mean(losses: dict[Path, torch.Tensor], images: list[ImageItem]) -> torch.Tensor:
        """Per-timestep MSE averaged over the images, summed in the images' order."""
        return torch.stack([losses[image.path] for image in images]).mean(dim=0)

    def _base_class_loss(self) -> torch.Tensor:
        """The base model's class losses (network at multiplier 0): computed once, since
        neither the base model nor the fixed noise ever changes."""
        if self._base is None:
            self.loop.network.set_multiplier(0.0)
            self._base = self._mean(self._per_image(self.classes), self.classes)
            self.loop.network.set_multiplier(1.0)
        return self._base

    def evaluate(self, epoch: int, step: int) -> Evaluation:
        """Score the network as it stands; every random stream is left as it was."""
        started = time.perf_counter()
        network = self.loop.network
        was_training = network.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        network.eval()
        try:
            with torch.no_grad():
                network.set_multiplier(1.0)
                losses = self._per_image(self.subject + self.classes)
                subject = self._mean(losses, self.subject)
                drift = base_loss = None
                if self.classes:
                    with_network = self._mean(losses, self.classes)
                    base_loss = self._base_class_loss()
                    drift = with_network - base_loss
        finally:
            network.set_multiplier(1.0)
            network.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        evaluation = Evaluation(
            epoch=epoch,
            step=step,
            subject_loss=float(subject.mean()),
            subject_bands=bands(subject),
            class_drift=None if drift is None else float(drift.mean()),
            class_drift_bands=None if drift is None else bands(drift),
            base_class_loss=None if base_loss is None else float(base_loss.mean()),
            seconds=round(seconds, 3),
        )
        self.evaluations.append(evaluation)
        return evaluation

    def saved(self) -> list[dict]:
        """The evaluations so far, for a resumed run to continue from (`restore`)."""
        return [asdict(e) for e in self.evaluations]

    def restore(self, saved: list[dict]) -> None:
        self.evaluations = [Evaluation(**e) for e in saved]
        self.seconds = sum(e.seconds for e in self.evaluations)

    def log(self, writer, evaluation: Evaluation) -> None:
        step = evaluation.step
        writer.add_scalar("val/epoch", evaluation.epoch, step)
        writer.add_scalar("val/subject_loss", evaluation.subject_loss, step)
        for band, value in evaluation.subject_bands.items():
            writer.add_scalar(f"val/subject_loss/{band}", value, step)
        if evaluation.class_drift is not None:
            writer.add_scalar("val/class_drift", evaluation.class_drift, step)
            for band, value in evaluation.class_drift_bands.items():
                writer.add_scalar(f"val/class_drift/{band}", value, step)

    def due(self, epoch: int, saved: bool) -> bool:
        return saved or epoch % self.settings.every_n_epochs == 0

    def recommend(self, epochs: list[int]) -> int | None:
        """The epoch (of `epochs`, the saved ones) to use: lowest subject loss among
        those whose class drift is within tolerance; if none is, the lowest drift."""
        scored = [e for e in self.evaluations if e.epoch in epochs]
        if not scored:
            return None
        tolerance = self.settings.drift_tolerance
        within = [
            e
            for e in scored
            if e.class_drift is None or e.class_drift <= tolerance * e.base_class_loss
        ]
        if within:
            return min(within, key=lambda e: (e.subject_loss, e.epoch)).epoch
        return min(scored, key=lambda e: (e.class_drift, e.epoch)).epoch

    def report(self, files: dict[int, str], recommended: int | None) -> dict:
        """What goes into validation.json and the manifest."""
        return {
            "held_out": [im.path.name for im in self.subject],
            "class_images": [im.path.name for im in self.classes],
            "timesteps": self.timesteps.tolist(),
            "drift_tolerance": self.settings.drift_tolerance,
            "evaluations": [asdict(e) for e in self.evaluations],
            "recommended_epoch": recommended,
            "recommended_file": files.get(recommended) if recommended is not None else None,
            "seconds": round(self.seconds, 3),
        }

    def table(self, files: dict[int, str], recommended: int | None) -> Table:
        table = Table(title="Validation per saved epoch", title_justify="left")
        for column in ("epoch", "file", "subject loss", "class drift", ""):
            table.add_column(column, justify="right" if column == "epoch" else "left")
        for e in self.evaluations:
            if e.epoch not in files:
                continue
            drift = "-" if e.class_drift is None else f"{e.class_drift:+.5f}"
            mark = "[green]recommended[/green]" if e.epoch == recommended else ""
            table.add_row(str(e.epoch), files[e.epoch], f"{e.subject_loss:.5f}", drift, mark)
        return table
