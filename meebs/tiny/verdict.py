"""`verdict RUN`: did the LoHA learn the subject, and did it keep the class?

Validation loss says which epoch denoises the held-out subject best; it does not say
whether the samples look like the subject. On the `tiny-trained` base a scorer can
(`meebs.tiny.meeb_scorer`), so the demo ends with a verdict per saved epoch:

- meeb rate: the share of the trigger prompt's samples (the run's first sample prompt,
  32 fixed seeds) that the scorer calls a meeb, by the colour and by the shape variant;
- class rate: the share of the class prompt's samples (the second sample prompt, the same
  seeds) it calls a person, and how much of the base model's class rate the epoch keeps.

The base model itself (no network) is the first row, and validation's recommended epoch
is marked. The table goes to the console and `verdict.json`; `verdict.png` shows the
first seeds of both prompts, base and every epoch side by side.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from meebs.errors import MeebsError
from meebs.files.atomic_write import write_text_atomic
from meebs.files.png import write_png
from meebs.models.base import BaseModel
from meebs.models.sampling import draw_batch, recipe_prompts
from meebs.network.apply import apply_network, remove_network
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe
from meebs.tiny.meeb_scorer import MeebScorer
from meebs.training.validation import RESULT_NAME as VALIDATION_RESULT
from meebs.use.generate import load_recorded_base
from meebs.use.grid import compose, epoch_files

SCORER_DIR = Path(__file__).parent.parent / "assets" / "tiny-trained" / "scorer"
SEEDS = tuple(range(1000, 1032))
GRID_SEEDS = 4
RESULT_NAME = "verdict.json"
GRID_NAME = "verdict.png"


@dataclasses.dataclass(frozen=True)
class Row:
    """One column of samples, scored."""

    label: str
    epoch: int | None
    meeb_rate: float
    meeb_rate_shape: float
    class_rate: float


def load_scorers(folder: Path = SCORER_DIR) -> dict[str, MeebScorer]:
    """The `colour` and `shape` scorers saved by `make pretrain-tiny`."""
    scorers = {}
    for name in ("colour", "shape"):
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise MeebsError(f"no meeb scorer at {path}: run `make pretrain-tiny`")
        scorers[name] = MeebScorer.load(path)
    return scorers


def score(
    base: BaseModel,
    recipe: Recipe,
    scorers: dict[str, MeebScorer],
    seeds: tuple[int, ...],
) -> tuple[tuple[float, float, float], list[torch.Tensor]]:
    """(meeb rate by colour, by shape, class rate) of the model as it is now, and the
    images of the trigger and the class prompt (the recipe's first two sample prompts)."""
    trigger, person = (
        draw_batch(
            base,
            prompt,
            list(seeds),
            device="cpu",
            clip_skip=recipe.train.clip_skip,
            max_token_length=recipe.train.max_token_length,
        )
        for prompt in recipe_prompts(recipe)[:2]
    )
    rates = (
        _share(scorers["colour"].classify(trigger), "meeb"),
        _share(scorers["shape"].classify(trigger), "meeb"),
        _share(scorers["colour"].classify(person), "person"),
    )
    return rates, [trigger, person]


def _share(labels: list[str], wanted: str) -> float:
    return sum(label == wanted for label in labels) / len(labels)


def latest_run(folder: Path) -> Path:
    """`folder` itself when it is a run, else its newest run (run ids sort by time)."""
    if (folder / "recipe.yaml").is_file() or not folder.is_dir():
        return folder
    runs = sorted(path.parent for path in folder.glob("*/recipe.yaml"))
    return runs[-1] if runs else folder


def make_verdict(
    run: Path, console: Console, *, scorer_dir: Path = SCORER_DIR, seeds: tuple[int, ...] = SEEDS
) -> list[Row]:
    """Score the base and every saved epoch of `run`; write the table, JSON and grid."""
    recipe_file = run / "recipe.yaml"
    if not recipe_file.is_file():
        raise MeebsError(f"{run} is not a run folder (no recipe.yaml); give outputs/NAME/RUN")
    recipe = load_recipe(recipe_file)
    prompts = recipe_prompts(recipe)
    if len(prompts) < 2:
        raise MeebsError(
            f"{recipe_file}: the verdict needs two sample prompts, the trigger prompt first "
            "and the class prompt second"
        )
    scorers = load_scorers(scorer_dir)
    base = load_recorded_base(dataclasses.asdict(recipe.model))
    columns: list[tuple[str, list[Image.Image]]] = []
    rows = []
    for label, epoch, path in [("base", None, None)] + [
        (f"epoch {epoch}", epoch, path) for epoch, path in epoch_files(run)
    ]:
        network = apply_network(path, base, te=1.0, unet=1.0) if path else None
        try:
            rates, images = score(base, recipe, scorers, seeds)
        finally:
            if network is not None:
                remove_network(network)
        rows.append(Row(label, epoch, *rates))
        columns.append((label, [_picture(batch[i]) for batch in images for i in range(GRID_SEEDS)]))
        console.print(f"scored {label}", highlight=False)
    recommended = _recommended_epoch(run)
    grid_labels = [f"{p.prompt}\nseed {s}" for p in prompts[:2] for s in seeds[:GRID_SEEDS]]
    write_png(run / GRID_NAME, compose(columns, grid_labels))
    result = {
        "trigger_prompt": prompts[0].prompt,
        "class_prompt": prompts[1].prompt,
        "seeds": list(seeds),
        "recommended_epoch": recommended,
        "rows": [dataclasses.asdict(row) for row in rows],
    }
    write_text_atomic(run / RESULT_NAME, json.dumps(result, indent=2) + "\n")
    console.print(table(rows, recommended, prompts[0].prompt, prompts[1].prompt, len(seeds)))
    console.print(f"wrote {run / RESULT_NAME} and {run / GRID_NAME}", highlight=False)
    return rows


def _picture(image: torch.Tensor) -> Image.Image:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _recommended_epoch(run: Path) -> int | None:
    path = run / VALIDATION_RESULT
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("recommended_epoch")


def table(rows: list[Row], recommended: int | None, trigger: str, person: str, seeds: int) -> Table:
    """The verdict as a rich table."""
    base_class = rows[0].class_rate
    result = Table(title=f"verdict: {seeds} seeds of {trigger!r} and {person!r}")
    for heading in ("", "meeb rate", "meeb rate (shape)", "class rate", "class kept", ""):
        result.add_column(heading, justify="right" if heading else "left")
    for row in rows:
        kept = f"{row.class_rate / base_class:.0%}" if base_class else "-"
        mark = "validation's pick" if row.epoch is not None and row.epoch == recommended else ""
        result.add_row(
            row.label,
            f"{row.meeb_rate:.0%}",
            f"{row.meeb_rate_shape:.0%}",
            f"{row.class_rate:.0%}",
            kept,
            mark,
        )
    return result
