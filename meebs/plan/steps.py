"""The plan: how many steps a recipe takes and which files it writes, before it runs.

kohya users were surprised by reg images: sd-scripts doubles an epoch when reg images
are present, and a GUI that computed the step count without that doubling wrote a
checkpoint only every second "epoch". Here one epoch is one pass over the training
images (with repeats) plus their balanced reg partners, and `plan` prints the exact
steps per epoch and every file name, next to the original project's
`images * repeats * epochs / batch` figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meebs.data.batches import count_batches
from meebs.data.buckets import bucket_for, make_buckets
from meebs.data.folders import DatasetScan, ImageItem, epoch_samples, scan_dataset
from meebs.data.validation_split import split_scan
from meebs.recipe.schema import Recipe


@dataclass(frozen=True)
class Plan:
    train_samples: int  # training images x repeats, per epoch
    reg_samples: int  # balanced reg samples per epoch (about train_samples, as sd-scripts)
    batches_per_epoch: int  # of batch_size x processes samples, split between processes
    steps_per_epoch: int  # optimizer steps (after gradient accumulation)
    epochs: int
    warmup_steps: int
    original_formula_steps: float  # images * repeats * epochs / batch
    kohya_gui_steps: int  # what kohya_ss computed for max_train_steps
    files: tuple[tuple[int, str], ...]  # (epoch, file name) in the order written
    bucket_counts: tuple[tuple[tuple[int, int], int], ...]
    processes: int = 1  # data-parallel processes (GPUs), each with its slice of a batch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def bucket_assigner(recipe: Recipe) -> Callable[[ImageItem], tuple[int, int]]:
    """The function that puts an image into its training resolution (bucket)."""
    data = recipe.data
    resolution = (data.resolution[0], data.resolution[1])
    buckets = (
        make_buckets(resolution, data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps)
        if data.enable_bucket
        else [resolution]
    )

    def assign(item: ImageItem) -> tuple[int, int]:
        return bucket_for(
            item.size, enable_bucket=data.enable_bucket, resolution=resolution, buckets=buckets
        )

    return assign


def epoch_file_names(name: str, epochs: int, save_every: int) -> list[tuple[int, str]]:
    """kohya's naming: `{name}-{epoch:06d}` for intermediate saves, `{name}` for the last."""
    files = [
        (epoch, f"{name}-{epoch:06d}.safetensors")
        for epoch in range(1, epochs)
        if epoch % save_every == 0
    ]
    files.append((epochs, f"{name}.safetensors"))
    return files


def scan_data(recipe: Recipe) -> DatasetScan:
    """Read the recipe's training and regularization folders, less validation's images."""
    data = recipe.data
    scan = scan_dataset(
        Path(data.train_dir),
        Path(data.reg_dir) if data.reg_dir else None,
        data.caption_extension,
        (data.resolution[0], data.resolution[1]),
    )
    return split_scan(recipe, scan)  # validation images leave the training set here


def make_plan(recipe: Recipe, scan: DatasetScan, processes: int = 1) -> Plan:
    """The step math; N processes train on batches N times `batch_size` (each process
    takes one slice), so an epoch has fewer, larger steps."""
    train = recipe.train
    samples = epoch_samples(scan)
    assign = bucket_assigner(recipe)
    batches = count_batches(samples, assign, train.batch_size * processes)
    steps_per_epoch = math.ceil(batches / train.gradient_accumulation_steps)
    total = steps_per_epoch * train.epochs
    n_train = scan.train_samples_per_epoch
    reg_factor = 2 if scan.reg else 1
    counts: dict[tuple[int, int], int] = {}
    for item in samples:
        bucket = assign(item)
        counts[bucket] = counts.get(bucket, 0) + 1
    return Plan(
        train_samples=n_train,
        reg_samples=len(samples) - n_train,
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        epochs=train.epochs,
        warmup_steps=int(train.lr_warmup * total),
        original_formula_steps=n_train * train.epochs / train.batch_size,
        kohya_gui_steps=math.ceil(
            n_train
            / train.batch_size
            / train.gradient_accumulation_steps
            * train.epochs
            * reg_factor
        ),
        files=tuple(
            epoch_file_names(recipe.output.name, train.epochs, recipe.output.save_every_n_epochs)
        ),
        bucket_counts=tuple(sorted(counts.items())),
        processes=processes,
    )
