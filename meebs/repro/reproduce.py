"""`reproduce`, `compare` and `record`: rerun a recorded run and prove it matched.

    reproduce RUN            rerun a run folder (or a results file) into a new run folder
    reproduce --recipe 1.3   rerun the recorded result for recipes/1.3.yaml on this kind of
                             machine (results/1.3/<hardware class>.json)
    compare A B              two network files, or two runs
    record RUN               copy a finished run's manifest to results/<recipe>/<class>.json

A rerun uses the recipe recorded in the run, not the file as it is now: if the file has
changed since, `reproduce` stops and names the keys, because the rerun would no longer
answer the question "does this version still reproduce?".

Exit codes: 0 bit-identical, 1 differs (the report says what and by how much), 2 could
not run (the one-line error says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from meebs.errors import MeebsError
from meebs.files.atomic_write import make_folder, write_text_atomic
from meebs.files.text_files import shown
from meebs.recipe.keys import recipe_differences
from meebs.recipe.loading import load_recipe, recipe_from_dict
from meebs.recipe.schema import Recipe
from meebs.runs.compare import (
    FileComparison,
    compare_files,
    compare_outputs,
    manifest_differences,
)
from meebs.runs.manifest import (
    RecipeOrigin,
    hardware,
    hardware_class,
    read_manifest,
    recipe_name,
)

IDENTICAL, DIFFERS, FAILED = 0, 1, 2
RESULTS_DIR = Path("results")


@dataclass(frozen=True)
class Reference:
    """What a rerun is compared against: a run folder (files at hand) or a results file
    (hashes only)."""

    manifest: dict[str, Any]
    run_dir: Path | None
    label: str


def load_reference(path: Path) -> Reference:
    manifest = read_manifest(path)
    if manifest["status"] == "failed":
        raise MeebsError(
            f"{path}: this run failed ({shown(manifest.get('failure', 'no reason recorded'))}); "
            "reproduce a finished run"
        )
    if manifest["status"] != "finished":
        raise MeebsError(
            f"{path}: this run is {manifest['status']}, not finished; resume it with "
            f"`train --resume {path}` first, or reproduce a finished run"
        )
    return Reference(manifest, path if path.is_dir() else None, str(path))


def find_results(recipe: str, results_dir: Path, console: Console) -> Path:
    """results/<recipe>/<this machine's class>.json, else another class's (the report
    will then name the hardware difference)."""
    folder = results_dir / recipe
    recorded = sorted(folder.glob("*.json"))
    if not recorded:
        raise MeebsError(
            f"no recorded result for recipe {recipe!r} in {folder}/; train it and `record` the run"
        )
    here = folder / f"{machine_class()}.json"
    if here.is_file():
        return here
    console.print(
        f"[yellow]no result recorded on this kind of machine ({here.name}); comparing with "
        f"{recorded[0].name}: expect small differences[/yellow]"
    )
    return recorded[0]


def machine_class() -> str:
    """This machine's hardware class as a run would record it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return hardware_class(hardware(device))


def recipe_for_rerun(reference: Reference, overrides: list[str]) -> tuple[Recipe, RecipeOrigin]:
    """The recorded recipe (plus `overrides`), after checking its file still says the same."""
    manifest = reference.manifest
    where = f"{reference.label} (recorded recipe)"
    recorded = recipe_from_dict(manifest["recipe"], where=where)
    source = manifest.get("recipe_source", {})  # read_manifest checked its types
    file, old_overrides = source.get("file"), tuple(source.get("overrides", ()))
    if file and _is_file(Path(file)):
        changed = recipe_differences(recorded, load_recipe(file, old_overrides))
        if changed:
            run_id = shown(manifest.get("run_id", "(no id)"))
            raise MeebsError(
                f"{shown(file, 300)} changed since run {run_id}: {_some(changed)}; "
                "restore the file, or train it and `record` the new run"
            )
    recipe = recipe_from_dict(manifest["recipe"], where=where, overrides=overrides)
    return recipe, RecipeOrigin(file, (*old_overrides, *overrides))


def _is_file(path: Path) -> bool:
    """`Path.is_file`, False also for a name no filesystem takes (OSError: too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _some(changes: list[str], count: int = 5) -> str:
    """The first `count` changes, each cut to 120 characters: a message stays one line."""
    cut = [change if len(change) <= 120 else f"{change[:117]}..." for change in changes]
    more = f"; and {len(changes) - count} more" if len(changes) > count else ""
    return "; ".join(cut[:count]) + more


def reproduce(path: Path, overrides: list[str], console: Console, command: str = "") -> int:
    from meebs.training.train import train  # the heavy imports only when a run is due

    reference = load_reference(path)
    recipe, origin = recipe_for_rerun(reference, overrides)
    console.rule(f"reproducing {reference.label}")
    result = train(recipe, console, command=command, origin=origin)
    if result.interrupted:
        return result.exit_status
    rerun = read_manifest(result.run_dir)
    return print_report(reference, rerun, result.run_dir, console)


def print_report(
    reference: Reference, rerun: dict[str, Any], rerun_dir: Path, console: Console
) -> int:
    """The input differences and the per-file weight report; returns the exit code."""
    differences = manifest_differences(reference.manifest, rerun)
    console.rule("inputs")
    if not differences:
        console.print("same recipe, data, base model, code, packages and hardware class")
    for kind, lines in differences.items():
        for line in lines:
            console.print(f"[bold]{kind}[/bold] {escape(line)}", highlight=False, soft_wrap=True)
    rows = compare_outputs(
        reference.manifest["outputs"], rerun["outputs"], reference.run_dir, rerun_dir
    )
    console.rule("network files")
    console.print(files_table(rows))
    matching = sum(row.status == "identical" for row in rows)
    if rows and matching == len(rows):
        console.print(f"[green]bit-identical: {matching}/{len(rows)} files match[/green]")
        return IDENTICAL
    console.print(f"[red]differs: {matching}/{len(rows)} files match[/red]")
    if reference.run_dir is None and any(row.status == "differs" for row in rows):
        console.print(
            "the reference is a results file (hashes only): reproduce a local run folder "
            "for the weight differences"
        )
    return DIFFERS


def files_table(rows: list[FileComparison]) -> Table:
    table = Table(Column("file", overflow="fold"), "result", "max |a-b|", "relative L2", "cosine")
    for row in rows:
        w = row.weights
        numbers = (f"{w.max_abs:.3e}", f"{w.rel_l2:.3e}", f"{w.cosine:.9f}") if w else ("", "", "")
        table.add_row(row.name, row.status, *numbers)
        for problem in w.problems if w else ():
            table.add_row("", problem, "", "", "")
    return table


def compare(a: Path, b: Path, console: Console) -> int:
    """Two network files, or two runs (folders or manifests)."""
    for path in (a, b):
        if not path.exists():
            raise MeebsError(f"{path}: no such file or run folder")
    if a.is_file() and a.suffix == ".safetensors" and b.is_file() and b.suffix == ".safetensors":
        row = compare_files(a, b)
        console.print(files_table([row]))
        return IDENTICAL if row.status == "identical" else DIFFERS
    reference = Reference(read_manifest(a), a if a.is_dir() else None, str(a))
    return print_report(reference, read_manifest(b), b, console)


def record(run: Path, results_dir: Path, replace: bool, console: Console) -> Path:
    """Copy a finished run's manifest to results/<recipe>/<hardware class>.json."""
    manifest = read_manifest(run)
    if manifest["status"] != "finished":
        raise MeebsError(
            f"{run}: only a finished run can be recorded (this one is {manifest['status']})"
        )
    target = results_dir / recipe_name(manifest) / f"{manifest['hardware_class']}.json"
    if target.exists() and not replace:
        raise MeebsError(f"{target} exists; pass --replace to re-record it (say why in the commit)")
    make_folder(target.parent, "give a writable folder with --results")
    write_text_atomic(target, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    console.print(f"recorded {run} as {target}")
    return target
