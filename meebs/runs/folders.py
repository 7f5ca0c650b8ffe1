"""Run folders: one per run, never reused, and the records written into them.

`outputs/{name}/{run id}/` where the run id is the UTC start time plus a short hash of
the resolved recipe, so a folder name says when and what. A run never writes into a
folder that exists: two runs started in the same second get `-2`, `-3`, ...
"""

from __future__ import annotations

import time
from pathlib import Path

from meebs.errors import MeebsError
from meebs.files.atomic_write import folder_error, make_folder
from meebs.recipe.schema import Recipe


def log_dir(recipe: Recipe, run_dir: Path) -> Path:
    """The run's TensorBoard folder: `logs/` inside it, or `{output.logging_dir}/{run id}`."""
    where = recipe.output.logging_dir
    return Path(where) / run_dir.name if where else run_dir / "logs"


def new_run_dir(recipe: Recipe, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    parent = Path(recipe.output.dir) / recipe.output.name
    make_folder(parent, "check output.dir")
    base = f"{stamp}-{recipe.sha256()[:8]}"
    for attempt in range(1, 100):
        run_dir = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:  # the folder exists, but cannot be written (or the disk is full)
            raise folder_error(
                f"a run folder in {parent}", exc, f"make {parent} writable or change output.dir"
            ) from None
        return run_dir
    raise MeebsError(f"{parent}: too many runs named {base}; wait a second and retry")
