"""The tables `plan` and `train` print before anything heavy happens: the data, the step
math, every file with its exact size, the memory estimate and the held-out images.

The size and memory estimates share one model built on the meta device (shapes, no
weights), so printing the plan of an SD 1.5 recipe takes about a second.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from meebs.data.folders import DatasetScan
from meebs.network.loha_layer import layer_paths
from meebs.plan.memory import estimate_memory
from meebs.plan.sizes import describe_sizes, empty_model, plan_file_sizes
from meebs.plan.steps import Plan
from meebs.recipe.schema import Recipe


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
    for line in layer_lines(recipe, layer_paths(model.network.loras, recipe.train.loha_layer)):
        console.print(line)
    if scan.held_out:
        _print_held_out(recipe, scan, plan, console)
    keep = recipe.output.keep_last_n_epochs
    if keep is not None:
        console.print(f"Only the last {keep} epoch file(s) are kept; older ones are removed.")
    for warning in scan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def layer_lines(recipe: Recipe, paths: dict[str, int]) -> list[str]:
    """Which forward computes the network's layers: LoHA's own paths (train.loha_layer),
    or lycoris' forward for every other algorithm and for LoHA modules with DoRA or a
    trained scalar, which only lycoris implements."""
    algo, chosen = recipe.network.algo, recipe.train.loha_layer
    if algo != "loha":
        count = paths.get("lycoris", 0)
        return [f"{algo} on {count} modules (lycoris' own forward; train.loha_layer is LoHA's)"]
    if not paths:
        return []
    taken = ", ".join(f"{path} on {count}" for path, count in paths.items())
    line = f"LoHA layers (train.loha_layer={chosen}): {taken}"
    if chosen != "lycoris" and "lycoris" in paths:
        line += " (DoRA and use_scalar modules take lycoris' own forward)"
    return [line]


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
