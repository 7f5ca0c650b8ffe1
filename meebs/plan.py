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

from rich.console import Console
from rich.table import Table

from meebs.buckets import bucket_for, make_buckets
from meebs.dataset import DatasetScan, ImageItem, count_batches, epoch_samples, scan_dataset
from meebs.recipe import Recipe
from meebs.validation_split import split_scan


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


def print_plan(recipe: Recipe, scan: DatasetScan, plan: Plan, console: Console) -> None:
    """The tables `plan` and `train` show before anything heavy happens."""
    folders = Table(title="Data", title_justify="left")
    for column in ("folder", "kind", "images", "repeats", "samples / epoch"):
        folders.add_column(column, justify="left" if column in ("folder", "kind") else "right")
    for subset in (*scan.train, *scan.reg):
        kind = "reg" if subset.is_reg else "train"
        n = len(subset.images)
        folders.add_row(
            str(subset.folder), kind, str(n), str(subset.repeats), str(n * subset.repeats)
        )
    if scan.reg:
        folders.add_row(
            "reg balanced to the training count", "reg", "", "", str(plan.reg_samples), style="dim"
        )
    console.print(folders)

    steps = Table(title="Steps", title_justify="left", show_header=False)
    steps.add_column("what")
    steps.add_column("value", justify="right")
    train = recipe.train
    accum = f" / grad accumulation {train.gradient_accumulation_steps}"
    steps.add_row("samples per epoch (train + reg)", str(plan.train_samples + plan.reg_samples))
    steps.add_row("buckets (resolution: samples)", _buckets_text(plan))
    batch = train.batch_size * plan.processes
    if plan.processes > 1:
        effective = batch * train.gradient_accumulation_steps
        steps.add_row(
            "processes (GPUs)",
            f"{plan.processes} x batch {train.batch_size} = {batch}; effective {effective}",
        )
    steps.add_row(f"batches per epoch (batch {batch})", str(plan.batches_per_epoch))
    steps.add_row(f"steps per epoch{accum}", str(plan.steps_per_epoch))
    steps.add_row("epochs", str(plan.epochs))
    steps.add_row("total steps", f"[bold]{plan.total_steps}[/bold]")
    steps.add_row("warmup steps", str(plan.warmup_steps))
    steps.add_row(
        "original formula: images x repeats x epochs / batch", f"{plan.original_formula_steps:g}"
    )
    steps.add_row("kohya_ss GUI max_train_steps", str(plan.kohya_gui_steps))
    console.print(steps)

    # these import this module; the model they share is built once (shapes, no weights)
    from meebs.memory_estimate import estimate_memory
    from meebs.size_estimate import describe_sizes, empty_model, plan_file_sizes

    model = empty_model(recipe)
    sizes = plan_file_sizes(recipe, scan, plan, model)
    files = Table(title="Files written into the run folder", title_justify="left")
    files.add_column("after epoch", justify="right")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for planned in sizes:
        files.add_row(str(planned.epoch), planned.name, planned.size_text())
    console.print(files)
    console.print(f"Each network file: {describe_sizes(sizes)}")
    if any(planned.least != planned.most for planned in sizes):
        console.print("A range: the final file names the epoch validation recommends.")
    for line in estimate_memory(recipe, scan, model).describe():
        console.print(line)
    if scan.held_out:
        _print_held_out(recipe, scan, plan, console)
    keep = recipe.output.keep_last_n_epochs
    if keep is not None:
        console.print(f"Only the last {keep} epoch file(s) are kept; older ones are removed.")
    for warning in scan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _buckets_text(plan: Plan) -> str:
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in plan.bucket_counts)


def _print_held_out(recipe: Recipe, scan: DatasetScan, plan: Plan, console: Console) -> None:
    """The validation images, and a warning when holding them out made a short batch."""
    val = recipe.validation
    where = f"folder {val.folder}" if val.folder else f"held out of training (seed {val.seed})"
    held = Table(title=f"Validation images: {where}", title_justify="left")
    held.add_column("image")
    held.add_column("caption")
    for image in scan.held_out:
        held.add_row(str(image.path), image.caption)
    console.print(held)
    samples = plan.train_samples + plan.reg_samples
    batch = recipe.train.batch_size
    if val.folder is None and samples % batch:
        console.print(
            f"[yellow]warning:[/yellow] with {len(scan.held_out)} image(s) held out, the "
            f"{samples} samples per epoch no longer divide by batch size {batch}: each epoch "
            "ends with a short batch"
        )
