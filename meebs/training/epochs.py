"""The data of each epoch: its batches in order, every random choice made up front.

Order, flips, caption shuffle and dropout come from one generator (`rng`) whose state
the run saves with every resume state; each sample's noise and timestep come from its
own seed (`noise_seed`): its place in the run. So a run continues exactly after a
resume, and N processes see the batches one process would see at N times the batch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console

from meebs.data import latents as latent_io
from meebs.data.batches import plan_batches, process_caption
from meebs.data.folders import DatasetScan, ImageItem
from meebs.data.images import background_for
from meebs.plan.steps import Plan, bucket_assigner
from meebs.recipe.schema import Recipe
from meebs.training.step import Batch
from meebs.training.stop import StopFlag, StopNow


def noise_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """The seed of one sample's noise and timestep: its place in the run, not in a process."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{batch}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes < 2**63 everywhere


class EpochData:
    """Batches of an epoch for this process, and the latent cache filled before them."""

    def __init__(
        self,
        recipe: Recipe,
        scan: DatasetScan,
        plan: Plan,
        accelerator: Accelerator,
        latent_cache: latent_io.LatentCache,
    ):
        self.recipe, self.scan, self.plan, self.accelerator = recipe, scan, plan, accelerator
        self.latent_cache = latent_cache
        self.rng = random.Random(recipe.train.seed)  # batch order, flips, caption choices
        self.assign_bucket = bucket_assigner(recipe)
        self.backgrounds = self._backgrounds()

    def rounds(self, samples: list[ImageItem], epoch: int) -> list[list[Batch | None]]:
        """The epoch's rounds: batches of `batch_size` x processes samples, each split
        into one slice per process (None where a short batch leaves a process none).

        Every random choice of the epoch (order, flips, captions, each sample's noise
        seed) is made here, the same in every process, so the processes' generators
        never drift apart, and N processes see exactly the batches one process would
        see with an N times larger batch.
        """
        per_device, world = self.recipe.train.batch_size, self.accelerator.num_processes
        batches = plan_batches(samples, self.assign_bucket, per_device * world, self.rng)
        flip = self.recipe.data.flip_aug
        rounds = []
        for index, batch in enumerate(batches):
            whole = Batch(
                [self.variant(item, flip and self.rng.random() < 0.5) for item in batch],
                batch,
                [self._caption(item) for item in batch],
                [
                    noise_seed(self.recipe.train.seed, epoch, index, slot)
                    for slot in range(len(batch))
                ],
            )
            slices = [
                Batch(*(part[i : i + per_device] for part in whole))
                for i in range(0, per_device * world, per_device)
            ]
            rounds.append([s if s.items else None for s in slices])
        return rounds

    def group(self, index: int) -> range:
        """The rounds of the optimizer step that round `index` belongs to: the step comes
        after every `accumulate` rounds and after the epoch's last, so a short last group
        never leaks into the next epoch."""
        accumulate = self.recipe.train.gradient_accumulation_steps
        start = index - index % accumulate
        return range(start, min(start + accumulate, self.plan.batches_per_epoch))

    def load(self, rounds: list[list[Batch | None]]) -> Iterator[tuple]:
        """(variants, items, captions, noise seeds, pixels or None) of this process's slice
        per round, all None where it has none; pixels are read ahead by workers."""
        mine = [batch[self.accelerator.process_index] for batch in rounds]
        if self.recipe.data.cache_latents:
            for batch in mine:
                yield (None,) * 5 if batch is None else (*batch, None)
            return
        loader = iter(
            latent_io.pixel_batches(
                [b.variants for b in mine if b is not None], self.recipe.data.num_workers
            )
        )
        for batch in mine:
            yield (None,) * 5 if batch is None else (*batch, next(loader))

    def variant(self, item: ImageItem, flip: bool) -> latent_io.Variant:
        return latent_io.Variant(
            item.path, self.assign_bucket(item), self.backgrounds[item.path], flip
        )

    def _backgrounds(self) -> dict[Path, str]:
        """A fixed background per unique image, so `alternate` splits the set evenly."""
        mode = self.recipe.data.background
        return {im.path: background_for(i, mode) for i, im in enumerate(self.scan.unique_images)}

    def cache_latents(self, samples: list[ImageItem], console: Console, stop: StopFlag) -> None:
        flips = (False, True) if self.recipe.data.flip_aug else (False,)
        variants = {self.variant(item, f) for item in samples for f in flips}
        # with the disk cache, the main process encodes and the others then read its files
        first = self.accelerator.main_process_first
        with first(), console.status(f"caching latents of {len(variants)} image variants"):
            for _ in self.latent_cache.fill(variants):
                if stop.requested:  # no step of this segment is done: nothing new to save
                    raise StopNow(stop.signum)
        cache = self.latent_cache
        for warning in cache.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
        console.print(
            f"latents of {len(variants)} image variants: {cache.encoded} encoded, "
            f"{cache.reused} from the disk cache"
        )

    def _caption(self, item: ImageItem) -> str:
        data = self.recipe.data
        return process_caption(
            item.caption,
            shuffle=data.shuffle_caption,
            keep_tokens=data.keep_tokens,
            dropout_rate=data.caption_dropout_rate,
            rng=self.rng,
        )
