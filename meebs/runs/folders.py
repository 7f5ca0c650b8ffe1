"""Run folders: one per run, never reused, and the records written into them.

`outputs/{name}/{run id}/` where the run id is the UTC start time plus a short hash of
the resolved recipe, so a folder name says when and what. A run never writes into a
folder that exists: two runs started in the same second get `-2`, `-3`, ... (`mkdir`
either makes a folder or fails, so two processes never both get one). While a process
trains a run it holds it (`holding`), so a second one cannot write into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from meebs.errors import MeebsError
from meebs.files.atomic_write import folder_error, make_folder, sync_folder
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
        sync_folder(parent)  # (the folder survives a power cut as long as its files do)
        return run_dir
    raise MeebsError(f"{parent}: too many runs named {base}; wait a second and retry")


# descriptors of the runs this process holds: a forked child (a data-loader worker) closes
# its copies at once, or the lock would outlive this process while the child lingers
_HELD: set[int] = set()


def _forget_held() -> None:
    for descriptor in _HELD:
        os.close(descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_held)


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """The run is this process's while the block runs: a `train --resume` of it from
    another process is refused, so tidying its temp files never removes a live writer's.
    An flock on the folder, which the kernel drops when the process ends, killed or not."""
    descriptor = os.open(run_dir, os.O_RDONLY)
    _HELD.add(descriptor)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MeebsError(
                f"{run_dir}: another process is training this run now; wait for it to end "
                "(or stop it), then resume"
            ) from None
        yield
    finally:
        _HELD.discard(descriptor)
        os.close(descriptor)
