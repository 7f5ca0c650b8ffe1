"""`grid RUN`: every sample prompt drawn with every saved epoch (and weight) in one picture.

Choosing the epoch to ship means comparing the same prompt and seed across epochs side by
side; scrolling through sample files one by one hides the trend. The grid is one PNG
(rows: prompt x seed, columns: epoch x weight) with plain labels in PIL's default font,
so nothing is downloaded, written atomically and logged to the run's TensorBoard folder
as the image `grid`, next to the training samples.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from meebs.errors import MeebsError
from meebs.files.png import write_png
from meebs.models.base import BaseModel
from meebs.models.sampling import SamplePrompt, generate_samples, recipe_prompts
from meebs.network.apply import apply_network, read_shapes, remove_network, set_multipliers
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe
from meebs.runs.folders import log_dir
from meebs.use.generate import load_recorded_base

GRID_NAME = "grid.png"
MIN_CELL = 128  # small samples (the 64 px demo) are enlarged to this, pixel for pixel
LABEL_WIDTH = 200
LINE = 14
PAD = 4
WRAP = 30

T = TypeVar("T")


def parse_numbers(option: str, text: str | None, kind: Callable[[str], T]) -> list[T] | None:
    """`0.25,0.5,1` as a list; None when the option was not given."""
    if text is None:
        return None
    try:
        return [kind(item) for item in text.split(",") if item.strip()] or None
    except ValueError:
        raise MeebsError(f"{option} {text!r}: give comma-separated numbers, e.g. 1,2") from None


def make_grid(
    run: Path,
    console: Console,
    *,
    weights: list[float] | None = None,
    seeds: list[int] | None = None,
    out: Path | None = None,
) -> Path:
    """Draw and write the grid; return its path."""
    recipe_file = run / "recipe.yaml"
    if not recipe_file.is_file():
        raise MeebsError(f"{run} is not a run folder (no recipe.yaml); give outputs/NAME/RUN")
    recipe = load_recipe(recipe_file)
    prompts = _rows(recipe_prompts(recipe), seeds)
    if not prompts:
        raise MeebsError(f"{recipe_file} has no sample prompts (sample.prompts) to draw")
    epochs = epoch_files(run)
    weights = weights or [1.0]
    out = out or run / GRID_NAME
    if not out.parent.is_dir():
        raise MeebsError(f"--out {out}: folder {out.parent} does not exist")
    base = load_recorded_base(dataclasses.asdict(recipe.model))
    columns: list[tuple[str, list[Image.Image]]] = []
    for epoch, path in epochs:
        network = apply_network(path, base, te=1.0, unet=1.0)
        for weight in weights:
            set_multipliers(network, te=weight, unet=weight)
            label = f"epoch {epoch}" + (f" w{weight:g}" if len(weights) > 1 else "")
            columns.append((label, _draw(recipe, base, prompts)))
        remove_network(network)
    grid = compose(columns, [_row_label(prompt) for prompt in prompts])
    write_png(out, grid)
    _log(recipe, run, grid, step=max(int(read_shapes(p)[1].get("ss_steps", 0)) for _, p in epochs))
    console.print(f"wrote {out} ({len(prompts)} rows x {len(columns)} columns)", highlight=False)
    return out


def compose(columns: list[tuple[str, list[Image.Image]]], row_labels: list[str]) -> Image.Image:
    """Lay images out in a labelled grid: a header row of column labels, a label column."""
    first = columns[0][1][0]
    scale = max(1, -(-MIN_CELL // min(first.size)))
    cell_w, cell_h = first.width * scale, first.height * scale
    header = 2 * LINE
    grid = Image.new(
        "RGB",
        (LABEL_WIDTH + len(columns) * (cell_w + PAD), header + len(row_labels) * (cell_h + PAD)),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, (label, images) in enumerate(columns):
        x = LABEL_WIDTH + column * (cell_w + PAD)
        draw.text((x, PAD), label, fill="black", font=font)
        for row, image in enumerate(images):
            enlarged = image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(enlarged, (x, header + row * (cell_h + PAD)))
    for row, label in enumerate(row_labels):
        draw.multiline_text(
            (PAD, header + row * (cell_h + PAD)), label, fill="black", font=font, spacing=2
        )
    return grid


def _rows(prompts: list[SamplePrompt], seeds: list[int] | None) -> list[SamplePrompt]:
    """Each prompt with its own seed, or with each of `seeds`."""
    if seeds is None:
        return prompts
    return [dataclasses.replace(prompt, seed=seed) for prompt in prompts for seed in seeds]


def epoch_files(run: Path) -> list[tuple[int, Path]]:
    """(epoch, file) of every network in the run, in training order."""
    found = []
    for path in run.glob("*.safetensors"):
        metadata = read_shapes(path)[1]
        order = (int(metadata.get("ss_epoch", 0)), int(metadata.get("ss_steps", 0)))
        found.append((order, path))
    if not found:
        raise MeebsError(f"{run} holds no network files (*.safetensors) yet")
    return [(order[0], path) for order, path in sorted(found)]


def _draw(recipe: Recipe, base: BaseModel, prompts: list[SamplePrompt]) -> list[Image.Image]:
    return generate_samples(
        base,
        prompts=prompts,
        device="cpu",
        dtype=base.unet.dtype,
        clip_skip=recipe.train.clip_skip,
        max_token_length=recipe.train.max_token_length,
    )


def _row_label(prompt: SamplePrompt) -> str:
    return "\n".join([*textwrap.wrap(prompt.prompt, WRAP)[:4], f"seed {prompt.seed}"])


def _log(recipe: Recipe, run: Path, grid: Image.Image, step: int) -> None:
    """Add the grid to the run's TensorBoard log dir (the one training wrote to)."""
    writer = SummaryWriter(log_dir=str(log_dir(recipe, run)))
    try:
        writer.add_image("grid", np.asarray(grid), step, dataformats="HWC")
    finally:
        writer.close()
