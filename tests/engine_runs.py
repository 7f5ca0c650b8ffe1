"""The short demo runs the engine tests share.

Two epochs of the demo data at batch 4 (60 steps, a few seconds on 2 cores) on the random
`tiny` base: these tests check the engine (files, metadata, logs, resume, generation),
not learning, so they skip the demo's own base, tiny-trained.

Each distinct run is trained once per test session (`short_demo` and `short_demo_seed7`
in conftest.py) through the real command line, and every test that only reads a run
reads that one. A test that writes into a run folder (grid, record) works on a copy; the
fixture checks at the end of the session that no file of the shared run changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe
from meebs.training import perf

REPO = Path(__file__).resolve().parent.parent
DEMO = "recipes/demo.yaml"
SHORT_RUN = ["model.builtin=tiny", "train.epochs=2", "train.batch_size=4", "sample.steps=2"]


@dataclass(frozen=True)
class SharedRun:
    """A finished run of `DEMO` trained with `overrides` (relative to the repository)."""

    run_dir: Path
    overrides: tuple[str, ...]

    @property
    def outputs(self) -> Path:
        """The outputs/ root holding the run (outputs/NAME/RUN)."""
        return self.run_dir.parent.parent

    @property
    def recipe(self) -> Recipe:
        return load_recipe(REPO / DEMO, list(self.overrides))

    @property
    def manifest(self) -> dict:
        return json.loads((self.run_dir / "manifest.json").read_text())

    @property
    def files(self) -> list[Path]:
        """The network files in the order they were written (the final one last)."""
        return [self.run_dir / name for name in self.manifest["outputs"]]


def train_demo(cli_main, out: Path, *overrides: str) -> SharedRun:
    """`entrypoint.py train recipes/demo.yaml SHORT_RUN... output.dir=out overrides...`,
    run from the repository root as `make` would; returns the new run."""
    argv = [*SHORT_RUN, f"output.dir={out}", *overrides]
    before = set(out.glob("meebs_demo/*"))
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        assert cli_main(["train", DEMO, *argv]) == 0
    finally:
        os.chdir(cwd)
    (run_dir,) = set(out.glob("meebs_demo/*")) - before
    return SharedRun(run_dir, tuple(argv))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its sha256: "nothing written over" is checked with it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """A real signal to this process right after `step` finished, as Ctrl-C would send."""
    original = perf.PerfMeter.step_done

    def step_done(self, sync=True):
        original(self, sync)
        if self.steps == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(perf.PerfMeter, "step_done", step_done)
