"""A training run: a recipe in, LyCORIS network files out (the loop itself: `loop.py`).

Read it top to bottom: `train()` scans the data, loads the base model, wraps it in a
LyCORIS network, caches what can be cached, then runs epochs of steps, saving files and
samples as the plan says. Every random choice comes from generators seeded by the
recipe, so the same recipe on the same machine gives the same bytes.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from meebs.errors import MeebsError
from meebs.files.atomic_write import make_folder, remove_temps, write_text_atomic
from meebs.files.safetensors_io import file_sha256
from meebs.models.base import describe_base
from meebs.models.loading import load_base_model
from meebs.models.machine import make_accelerator, place_models, set_attention
from meebs.models.sampling import recipe_prompts
from meebs.network.build import count_modules
from meebs.network.load_weights import load_network_weights
from meebs.network.loha_layer import use_layer_path
from meebs.network.optim import build_lr_scheduler, build_optimizer, param_groups
from meebs.plan.metadata import RunFacts, recipe_network
from meebs.plan.report import print_plan
from meebs.plan.steps import make_plan, scan_data
from meebs.recipe.keys import recipe_differences
from meebs.recipe.loading import recipe_from_dict
from meebs.recipe.schema import Recipe
from meebs.runs.compare import input_differences
from meebs.runs.folders import holding, log_dir, new_run_dir
from meebs.runs.manifest import (
    MANIFEST_NAME,
    RecipeOrigin,
    hardware,
    hardware_class,
    new_manifest,
    read_manifest,
    utc_now,
    write_manifest,
)
from meebs.training.determinism import (
    XFORMERS_BACKWARD,
    NondeterminismWatch,
    apply_determinism,
    nondeterminism_warnings,
    op_warnings,
)
from meebs.training.loop import Loop, RunResult
from meebs.training.stop import StopNow, signal_name, stop_after_the_step
from meebs.training.train_state import (
    STATE_NAME,
    load_state,
)


def train(
    recipe: Recipe, console: Console, command: str = "", origin: RecipeOrigin | None = None
) -> RunResult:
    """A new run of `recipe` in a new run folder (the main process's; the others, which
    compute the same network, write theirs to a temporary folder)."""
    loop = prepare(recipe, console)
    run_dir = new_run_dir(recipe) if loop.accelerator.is_main_process else _scratch_dir(loop)
    try:
        write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        manifest = new_manifest(
            run_id=run_dir.name,
            command=command,
            recipe=recipe,
            origin=origin,
            data=loop.data_manifest,
            base_model={"name": loop.facts.base_name, "sha256": loop.facts.base_sha256},
            device=loop.accelerator.device,
            determinism=loop.determinism,
            planned_steps=loop.plan.total_steps,
        )
        manifest["processes"] = {"count": loop.plan.processes}
        return _run_in(loop, RunResult(run_dir), manifest, console, command)
    except KeyboardInterrupt as stop:
        raise _stopped_at_once(loop, run_dir, stop, console) from None


def _stopped_at_once(loop: Loop, run_dir: Path, stop: KeyboardInterrupt, console) -> StopNow:
    """Say what a stop that could not wait for the step's end (a second signal, or one
    while latents were cached) left behind. A run that saved nothing yet is removed:
    there is nothing in it to resume, and a folder that `--resume` refuses helps no one."""
    signum = stop.signum if isinstance(stop, StopNow) else signal.SIGINT
    how = f"stopped ({signal_name(signum)})"
    if (run_dir / STATE_NAME).is_file():
        console.print(
            f"[yellow]{how}:[/yellow] nothing since the last save was kept; continue from "
            f"the last saved state with: train --resume {run_dir}"
        )
    elif loop.accelerator.is_main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(log_dir(loop.recipe, run_dir), ignore_errors=True)
        console.print(
            f"[yellow]{how}[/yellow] before anything was saved: removed {run_dir} (the "
            "latents cached so far are kept for the next run)"
        )
    return StopNow(signum, reported=True)


def _scratch_dir(loop: Loop) -> Path:
    """Where a process other than the main one writes its (identical) files."""
    return Path(tempfile.mkdtemp(prefix=f"meebs-rank{loop.accelerator.process_index}-"))


def _run_in(
    loop: Loop, result: RunResult, manifest: dict, console: Console, command: str
) -> RunResult:
    try:
        with holding(result.run_dir):
            _tidy(result.run_dir, console)
            return run_segment(loop, result, manifest, console, command)
    finally:
        if not loop.accelerator.is_main_process:
            shutil.rmtree(result.run_dir, ignore_errors=True)


def _tidy(run_dir: Path, console: Console) -> None:
    """Remove the temp files of writes a kill cut short (never outputs: only a complete
    file is renamed to its name). The caller holds the run, so none is being written."""
    removed = remove_temps(run_dir) + remove_temps(run_dir / "samples")
    if removed:
        console.print(f"removed {removed} temp file(s) of writes cut short in {run_dir}")


def resume(
    run_dir: Path, console: Console, command: str = "", recipe: Recipe | None = None
) -> RunResult:
    """Continue an interrupted run in its own folder from its last saved state; the files
    it writes are the bytes an uninterrupted run would have written."""
    if run_dir.is_dir() and not (run_dir / MANIFEST_NAME).exists():
        raise MeebsError(
            f"{run_dir}: no {MANIFEST_NAME}: not a run, or one stopped as it started, "
            "before anything was saved; nothing to resume: train the recipe again"
        )
    manifest = read_manifest(run_dir)
    if manifest["status"] == "finished":
        # a kill between the last manifest and the state's removal leaves it behind
        (run_dir / STATE_NAME).unlink(missing_ok=True)
        raise MeebsError(
            f"{run_dir}: this run finished all {manifest['steps']} steps; nothing to resume "
            "(train the recipe again for a new run)"
        )
    recorded = recipe_from_dict(manifest["recipe"], where=f"{run_dir / MANIFEST_NAME}")
    if recipe is not None:
        changed = recipe_differences(recorded, recipe)
        if changed:
            raise MeebsError(
                f"{run_dir}: a resumed run keeps its recipe, but the one given differs: "
                f"{'; '.join(changed)}; resume without a recipe, or train it as a new run"
            )
    state = load_state(run_dir / STATE_NAME)
    loop = prepare(recorded, console)
    changed = input_differences(manifest, loop.data_manifest, loop.facts.base_sha256)
    if changed:
        raise MeebsError(
            f"{run_dir}: inputs changed since the run stopped: {'; '.join(changed)}; "
            "restore them to resume, or train again"
        )
    processes = manifest.get("processes", {}).get("count", 1)
    if processes != loop.plan.processes:
        raise MeebsError(
            f"{run_dir}: the run was trained by {processes} process(es) and this is "
            f"{loop.plan.processes}; resume it with GPUS={processes}"
        )
    loop.restore(state)
    out_dir = run_dir if loop.accelerator.is_main_process else _scratch_dir(loop)
    result = RunResult(out_dir, files=[out_dir / name for name in state.position.files])
    result.epoch_losses = list(state.position.epoch_losses)
    console.print(f"resuming {run_dir} at step {loop.step} of {loop.plan.total_steps}")
    try:
        return _run_in(loop, result, manifest, console, command)
    except KeyboardInterrupt as stop:
        raise _stopped_at_once(loop, run_dir, stop, console) from None


def prepare(recipe: Recipe, console: Console) -> Loop:
    """Everything before the first step: data, plan, base model, network, optimizer."""
    determinism = apply_determinism(recipe)
    accelerator, fallbacks = make_accelerator(recipe)
    console.quiet = console.quiet or not accelerator.is_main_process  # one process speaks
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan, accelerator.num_processes)
    prompts = recipe_prompts(recipe)  # a bad prompt line stops the run now, not after epoch 1
    print_plan(recipe, scan, plan, console)

    base = load_base_model(
        builtin=recipe.model.builtin,
        path=Path(recipe.model.path) if recipe.model.path else None,
        sha256=recipe.model.sha256,
        allow_pickle=recipe.model.allow_pickle,
    )
    console.print(describe_base(base))
    attention = set_attention(base, recipe, fallbacks)
    if attention == "xformers":
        determinism["nondeterministic_backends"].append(XFORMERS_BACKWARD)

    torch.manual_seed(recipe.train.seed)  # network init
    train_te = recipe.text_encoder_lr > 0
    network = recipe_network(recipe, base.unet, base.text_encoder)
    unet_modules, te_modules = count_modules(network)
    if recipe.network.weights:
        load_network_weights(network, Path(recipe.network.weights))
    routed = use_layer_path(network.loras, recipe.train.loha_layer)
    layer = "".join(f", {path} layer path on {count}" for path, count in sorted(routed.items()))
    console.print(
        f"network: {recipe.network.algo}, {unet_modules} UNet + {te_modules} text-encoder "
        f"modules{layer}"
    )
    place_models(base, network, accelerator, recipe, train_te)
    optimizer, optimizer_name, notes = build_optimizer(param_groups(network, recipe), recipe)
    fallbacks += notes
    lr_scheduler = build_lr_scheduler(optimizer, recipe, plan.total_steps, plan.warmup_steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    for message in fallbacks:
        console.print(f"[yellow]fallback:[/yellow] {message}")
    for message in nondeterminism_warnings(determinism, set()):
        console.print(f"[yellow]not reproducible:[/yellow] {message}")

    facts = RunFacts(
        base_name=base.name,
        base_sha256=base.sha256,
        base_legacy_hash=base.legacy_hash,
        mixed_precision=accelerator.mixed_precision,
        optimizer=optimizer_name,
        attention=attention,
        fallbacks=tuple(fallbacks),
    )
    loop = Loop(
        recipe, scan, plan, base, network, optimizer, lr_scheduler, accelerator, facts, prompts
    )
    loop.determinism = determinism
    return loop


def run_segment(
    loop: Loop, result: RunResult, manifest: dict, console: Console, command: str
) -> RunResult:
    """Run the loop from where it stands, keeping the manifest up to date around it."""
    recipe, run_dir = loop.recipe, result.run_dir
    resumed_at = loop.step
    segment = {"command": command, "started_at": utc_now(), "from_step": resumed_at}
    segment["hardware_class"] = hardware_class(hardware(loop.accelerator.device))
    manifest["segments"].append(segment)
    manifest["status"] = "running"
    manifest.pop("failure", None)  # an earlier segment's
    logs = log_dir(recipe, run_dir)
    make_folder(logs, "fix output.logging_dir or its permissions")
    write_manifest(run_dir, manifest)
    # after a resume, events past the saved step (logged before the stop) are dropped
    writer = SummaryWriter(log_dir=str(logs), purge_step=resumed_at + 1 if resumed_at else None)
    watch = NondeterminismWatch()
    started = time.perf_counter()
    try:
        with stop_after_the_step() as stop, watch.watching():
            loop.run(result, writer, console, stop)
        if loop.plan.processes > 1:
            check_processes_agree(loop, manifest, console)
    except MeebsError as failure:  # e.g. the loss diverged: the manifest says why
        manifest["failure"] = str(failure)
        raise
    finally:
        writer.close()
        segment.update(
            finished_at=utc_now(),
            to_step=loop.step,
            duration_s=round(time.perf_counter() - started, 3),
            perf=result.perf,
        )
        finish_manifest(manifest, loop, result, watch.ops)
        write_manifest(run_dir, manifest)
    for message in op_warnings(watch.ops):
        console.print(f"[yellow]not reproducible:[/yellow] {message}")
    if manifest["status"] == "finished":
        (run_dir / STATE_NAME).unlink(missing_ok=True)
    return result


def check_processes_agree(loop: Loop, manifest: dict, console: Console) -> None:
    """Every process must end with the same network: record each one's digest, and say
    so loudly if they drifted apart (the main process's files are the run's result)."""
    digest = hashlib.sha256()
    for _, tensor in sorted(loop.network.state_dict().items()):
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digests = gather_object([digest.hexdigest()])
    manifest["processes"]["network_sha256"] = digests
    if len(set(digests)) > 1:
        console.print(
            "[red]warning:[/red] the processes ended with different networks "
            f"({', '.join(d[:12] for d in digests)}); the main process's files were kept"
        )


def finish_manifest(manifest: dict, loop: Loop, result: RunResult, ops: set[str]) -> None:
    """The run's outcome: status, files and their sha256, losses, times."""
    done = result.steps == loop.plan.total_steps and not result.interrupted
    manifest["status"] = "finished" if done else "interrupted"
    if "failure" in manifest:
        manifest["status"] = "failed"
    manifest["steps"] = loop.step
    manifest["epoch_losses"] = result.epoch_losses
    manifest["outputs"] = {f.name: file_sha256(f) for f in result.files if f.is_file()}
    samples = sorted((result.run_dir / "samples").glob("*.png"))
    manifest["samples"] = {f.name: file_sha256(f) for f in samples}
    ops_seen = set(manifest["determinism"].get("nondeterministic_ops", [])) | ops
    manifest["determinism"]["nondeterministic_ops"] = sorted(ops_seen)
    manifest["fallbacks"] = list(loop.facts.fallbacks)
    manifest["perf"] = result.perf
    if result.validation:
        manifest["validation"] = result.validation
    manifest["finished_at"] = utc_now()
    manifest["duration_s"] = round(sum(s.get("duration_s", 0.0) for s in manifest["segments"]), 3)
