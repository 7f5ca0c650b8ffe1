"""The training loop: a recipe in, LyCORIS network files out.

Read it top to bottom: `train()` scans the data, loads the base model, wraps it in a
LyCORIS network, caches what can be cached, then runs epochs of steps, saving files and
samples as the plan says. Every random choice comes from generators seeded by the
recipe, so the same recipe on the same machine gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.tensorboard import SummaryWriter

from meebs.data import latents as latent_io
from meebs.data.dataset import (
    ImageItem,
    background_for,
    epoch_samples,
    plan_batches,
    process_caption,
)
from meebs.errors import MeebsError, TrainingDiverged
from meebs.files.atomic_write import make_folder, write_atomic, write_text_atomic
from meebs.files.hash_cache import cached_sha256
from meebs.files.safetensors_io import file_sha256
from meebs.models import text_encoding
from meebs.models.base import describe_base, load_base_model
from meebs.models.machine import make_accelerator, place_models, set_attention
from meebs.models.sampling import generate_samples, recipe_prompts, sample_file_name
from meebs.network.build import SAVE_DTYPES, count_modules, load_network_weights, save_network
from meebs.network.loha_layer import use_layer_path
from meebs.network.optim import build_lr_scheduler, build_optimizer, param_groups
from meebs.plan.metadata import RECOMMENDED_EPOCH_KEY, RunFacts, build_metadata, recipe_network
from meebs.plan.report import print_plan
from meebs.plan.steps import bucket_assigner, make_plan, scan_data
from meebs.recipe.schema import Recipe, recipe_differences, recipe_from_dict
from meebs.runs.compare import input_differences
from meebs.runs.folders import log_dir, new_run_dir
from meebs.runs.manifest import (
    MANIFEST_NAME,
    RecipeOrigin,
    data_manifest,
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
from meebs.training.perf import PerfMeter
from meebs.training.stop import StopFlag, StopNow, signal_name, stop_after_the_step
from meebs.training.train_state import (
    STATE_NAME,
    Position,
    TrainState,
    load_state,
    rng_from_json,
    rng_to_json,
    save_state,
)
from meebs.training.validation import RESULT_NAME as VALIDATION_NAME
from meebs.training.validation import Validator

RANK_SEED_STRIDE = 1000  # process r's VAE sampling generator: seed + 1000 r + 2


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait for the GPU's queue
    (pinned memory, asynchronous copy); a plain move elsewhere."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Batch(NamedTuple):
    variants: list[latent_io.Variant]
    items: list[ImageItem]
    captions: list[str]
    noise_seeds: list[int]


def noise_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """The seed of one sample's noise and timestep: its place in the run, not in a process."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{batch}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes < 2**63 everywhere


@dataclass
class RunResult:
    run_dir: Path
    files: list[Path] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    stop_signal: int | None = None  # the signal that stopped the run after a step
    perf: dict[str, float] = field(default_factory=dict)
    validation: dict = field(default_factory=dict)  # validation.json's content, when enabled
    recommended_epoch: int | None = None
    validation_s: float = 0.0  # seconds spent evaluating

    @property
    def manifest(self) -> Path:
        return self.run_dir / MANIFEST_NAME

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None

    @property
    def exit_status(self) -> int:
        """0 for a finished run; 128 + the signal for one stopped by Ctrl-C (130) or
        SIGTERM (143), as a shell reports a process that the signal ended."""
        return StopNow(self.stop_signal).exit_status if self.interrupted else 0


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
        return run_segment(loop, result, manifest, console, command)
    finally:
        if not loop.accelerator.is_main_process:
            shutil.rmtree(result.run_dir, ignore_errors=True)


def resume(
    run_dir: Path, console: Console, command: str = "", recipe: Recipe | None = None
) -> RunResult:
    """Continue an interrupted run in its own folder from its last saved state; the files
    it writes are the bytes an uninterrupted run would have written."""
    manifest = read_manifest(run_dir)
    if manifest["status"] == "finished":
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
    layer = f", {recipe.train.loha_layer} layer path on {routed}" if routed else ""
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


class Loop:
    """State of one run's optimisation; `run()` is the loop itself."""

    def __init__(
        self, recipe, scan, plan, base, network, optimizer, lr_scheduler, acc, facts, prompts
    ):
        self.recipe, self.scan, self.plan, self.base = recipe, scan, plan, base
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.accelerator, self.facts, self.prompts = acc, facts, prompts
        seed = recipe.train.seed
        self.data_rng = random.Random(seed)  # batch order, flips, caption shuffle/dropout
        # noise and timesteps are seeded per sample (`noise_seed`); VAE sampling per process
        rank_seed = seed + RANK_SEED_STRIDE * acc.process_index
        self.vae_gen = torch.Generator().manual_seed(rank_seed + 2)  # latent sampling, uncached
        self.assign_bucket = bucket_assigner(recipe)
        self.backgrounds = self._backgrounds()
        self.train_te = bool(network.text_encoder_loras) and recipe.text_encoder_lr > 0
        self.text_cache: dict[str, torch.Tensor] = {}
        # each image hashed once: for the manifest and to address its cached latents
        self.image_sha256 = {im.path: cached_sha256(im.path) for im in scan.unique_images}
        self.data_manifest = data_manifest(scan, self.image_sha256)
        store = latent_io.latent_store() if recipe.data.cache_latents_to_disk else None
        self.latent_cache = latent_io.LatentCache(
            base.vae, base.sha256, seed, store, self.image_sha256
        )
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(acc.device)
        self.step = 0
        self._pending: list[tuple[int, int, dict[str, float]]] = []  # steps not yet logged
        self.perf = PerfMeter(acc.device)
        self.epoch_rng = self.data_rng.getstate()
        self.resuming: TrainState | None = None  # set by `restore`
        self.determinism: dict = {}  # set by `prepare`

    # ---------------------------------------------------------------- state
    def _position(
        self, epoch: int, batches_done: int, losses: list[torch.Tensor], result: RunResult
    ) -> Position:
        return Position(
            epoch=epoch,
            batch=batches_done,
            step=self.step,
            epoch_rng=rng_to_json(self.epoch_rng),
            data_rng=rng_to_json(self.data_rng.getstate()),
            epoch_losses=list(result.epoch_losses),
            losses=torch.stack(losses).tolist() if losses else [],
            files=[f.name for f in result.files],
            evaluations=self.validator.saved() if self.validator else [],
        )

    def _save_state(self, run_dir: Path, position: Position) -> None:
        generators = {"vae": self.vae_gen.get_state()}
        generators["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for index, state in enumerate(torch.cuda.get_rng_state_all()):
                generators[f"cuda.{index}"] = state
        state = TrainState(
            position=position,
            network=self.network.state_dict(),
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            generators=generators,
        )
        save_state(run_dir / STATE_NAME, state)

    def restore(self, state: TrainState) -> None:
        """Load a saved state; `run` then continues from its position."""
        self.network.load_state_dict(state.network)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        self.step = state.position.step
        self.resuming = state

    def _restore_generators(self, saved: dict[str, torch.Tensor]) -> None:
        """After the latent cache is filled (which draws from a fresh VAE generator, as
        the first run did), every generator continues from its saved state."""
        self.vae_gen.set_state(saved["vae"])
        torch.set_rng_state(saved["torch"])
        for key, state in saved.items():
            if key.startswith("cuda.") and torch.cuda.is_available():
                torch.cuda.set_rng_state(state, int(key.split(".")[1]))

    # ---------------------------------------------------------------- the loop
    def run(
        self, result: RunResult, writer: SummaryWriter, console: Console, stop: StopFlag
    ) -> None:
        recipe, plan = self.recipe, self.plan
        samples = epoch_samples(self.scan)
        if recipe.data.cache_latents:
            self._cache_latents(samples, console, stop)
        resuming, self.resuming = self.resuming, None
        at = resuming.position if resuming else None
        if resuming:
            self._restore_generators(resuming.generators)
        # validation never touches training's random streams, so only the process that
        # writes the run's files needs to spend the time
        scores = recipe.validation.enabled and self.accelerator.is_main_process
        self.validator = Validator(self, console) if scores else None
        if self.validator and resuming:  # the scores of the epochs before the stop
            self.validator.restore(at.evaluations)
        elif self.validator:  # epoch 0: the base model, the baseline
            self._validate(0, result, writer)
        with self._progress(console) as progress:
            task = progress.add_task(
                "train", total=plan.total_steps, completed=self.step, epoch=0, loss=0.0, lr=0.0
            )
            for epoch in range(at.epoch if at else 1, plan.epochs + 1):
                if at:
                    self.data_rng.setstate(rng_from_json(at.epoch_rng))
                self.epoch_rng = self.data_rng.getstate()
                rounds = self._epoch_plan(samples, epoch)
                done, losses = 0, []
                if at:  # the epoch's batch order is rebuilt; skip the rounds already done
                    self.data_rng.setstate(rng_from_json(at.data_rng))
                    device = self.accelerator.device
                    losses = [torch.tensor(v, device=device) for v in at.losses]
                    done, at = at.batch, None
                for index, batch in enumerate(self._load(rounds[done:]), start=done):
                    group = self._group(index)
                    ends_group = index == group[-1]
                    in_step = sum(len(b.items) for r in group for b in rounds[r] if b is not None)
                    loss = self._micro_step(*batch, in_step=in_step, optimizer_step=ends_group)
                    done = index + 1
                    if loss is not None:  # None: this process had no batch in this round
                        losses.append(loss)
                    if not ends_group:
                        continue
                    self.step += 1
                    last = index == len(rounds) - 1
                    log_now = self.step % recipe.train.log_every_n_steps == 0 or last
                    self.perf.step_done(sync=log_now)
                    self._pending.append((self.step, len(losses), self._lrs()))
                    progress.update(task, advance=1, epoch=epoch)
                    if log_now or stop.requested:  # one host-device sync per flush
                        last_loss, last_lr = self._flush_log(writer, losses, result.run_dir)
                        progress.update(task, loss=last_loss, lr=last_lr)
                    if stop.requested:
                        break
                if stop.requested:
                    stopped_at = self._position(epoch, done, losses, result)
                    break
                epoch_losses = torch.stack(losses).tolist() if losses else [float("nan")]
                result.epoch_losses.append(sum(epoch_losses) / len(epoch_losses))
                writer.add_scalar("loss/epoch", result.epoch_losses[-1], epoch)
                with self.perf.excluded():
                    self._end_of_epoch(epoch, result, writer)
        result.steps = self.step
        result.perf = self.perf.summary()
        console.print(self.perf.line())
        if stop.requested:
            self._save_interrupted(result, console, stopped_at, stop.signum)
        else:
            if self.validator:
                console.print(self.validator.table(self._kept_files(), result.recommended_epoch))
                write_text_atomic(
                    result.run_dir / VALIDATION_NAME, json.dumps(result.validation, indent=2)
                )
            console.print(f"[green]done:[/green] {len(result.files)} file(s) in {result.run_dir}")

    def _micro_step(
        self, variants, items, captions, noise_seeds, pixels, *, in_step: int, optimizer_step: bool
    ) -> torch.Tensor | None:
        """Forward and backward on this process's slice of a round (its loss weighted by
        its share of the `in_step` samples of the optimizer step, over all processes and
        accumulated rounds); with `optimizer_step`, clip, step and clear the gradients.
        The loss stays on the device (reading it is a sync); None when this process has
        no samples in the round (a bucket's short last batch, on several processes)."""
        loss = None
        if items is not None:
            batch = Batch(variants, items, captions, noise_seeds)
            loss = self._forward_backward(batch, pixels, len(items) / in_step)
        if optimizer_step:
            if self.accelerator.num_processes > 1:
                self._sum_gradients()
            max_norm = self.recipe.train.max_grad_norm
            if max_norm > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                self.accelerator.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _forward_backward(self, batch: Batch, pixels, scale: float) -> torch.Tensor:
        base, device = self.base, self.accelerator.device
        variants, items = batch.variants, batch.items
        if pixels is None:
            latents = self.latent_cache.batch(variants)
        else:
            latents = latent_io.encode(base.vae, pixels, self.vae_gen)
        latents = latents.to(device)
        hidden = self._encode_text(batch.captions)
        noise, timesteps = self._noise(latents.shape, batch.noise_seeds)
        weights = self._loss_weights(items, timesteps)
        noise, timesteps, weights = (to_device(t, device) for t in (noise, timesteps, weights))
        losses = self._denoising_losses(latents, noise.to(latents.dtype), timesteps, hidden)
        loss = (losses * weights).mean()
        self.accelerator.backward(loss * scale)
        return loss.detach()

    def _denoising_losses(self, latents, noise, timesteps, hidden) -> torch.Tensor:
        """The UNet's per-sample MSE at predicting `noise` from the noised latents, all on
        the device. The noising is diffusers' `add_noise` formula on a device copy of the
        schedule: `add_noise` copies the schedule to the device on every call, and on a GPU
        such a copy makes the host wait for every queued kernel."""
        alpha = self.alphas_cumprod.to(latents.dtype)[timesteps].view(-1, 1, 1, 1)
        noisy = alpha**0.5 * latents + (1 - alpha) ** 0.5 * noise
        with self.accelerator.autocast():
            pred = self.base.unet(noisy, timesteps, hidden).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

    def _sum_gradients(self) -> None:
        """All processes' gradients summed (each loss was already divided by the batches of
        the whole step), in one all-reduce of one flat buffer.

        This is what DDP does, without its forward wrapper: our forward runs through the
        UNet and text encoder, which DDP would not see as the network's module. A process
        that had no batch contributes zeros.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "sum")
        for param, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
            param.grad = chunk.view_as(param)

    # ---------------------------------------------------------------- data
    def _epoch_plan(self, samples: list[ImageItem], epoch: int) -> list[list[Batch | None]]:
        """The epoch's rounds: batches of `batch_size` x processes samples, each split
        into one slice per process (None where a short batch leaves a process none).

        Every random choice of the epoch (order, flips, captions, each sample's noise
        seed) is made here, the same in every process, so the processes' generators
        never drift apart, and N processes see exactly the batches one process would
        see with an N times larger batch.
        """
        per_device, world = self.recipe.train.batch_size, self.accelerator.num_processes
        batches = plan_batches(samples, self.assign_bucket, per_device * world, self.data_rng)
        flip = self.recipe.data.flip_aug
        rounds = []
        for index, batch in enumerate(batches):
            whole = Batch(
                [self._variant(item, flip and self.data_rng.random() < 0.5) for item in batch],
                batch,
                [self._caption(item) for item in batch],
                [
                    noise_seed(self.recipe.train.seed, epoch, index, slot)
                    for slot in range(len(batch))
                ],
            )
            slices = [
                Batch(*(part[i : i + per_device] for part in whole))
                for i in range(0, per_device * world, per_device)
            ]
            rounds.append([s if s.items else None for s in slices])
        return rounds

    def _group(self, index: int) -> range:
        """The rounds of the optimizer step that round `index` belongs to: the step comes
        after every `accumulate` rounds and after the epoch's last, so a short last group
        never leaks into the next epoch."""
        accumulate = self.recipe.train.gradient_accumulation_steps
        start = index - index % accumulate
        return range(start, min(start + accumulate, self.plan.batches_per_epoch))

    def _load(self, rounds: list[list[Batch | None]]) -> Iterator[tuple]:
        """(variants, items, captions, noise seeds, pixels or None) of this process's slice
        per round, all None where it has none; pixels are read ahead by workers."""
        mine = [batch[self.accelerator.process_index] for batch in rounds]
        if self.recipe.data.cache_latents:
            for batch in mine:
                yield (None,) * 5 if batch is None else (*batch, None)
            return
        loader = iter(
            latent_io.pixel_batches(
                [b.variants for b in mine if b is not None], self.recipe.data.num_workers
            )
        )
        for batch in mine:
            yield (None,) * 5 if batch is None else (*batch, next(loader))

    def _variant(self, item: ImageItem, flip: bool) -> latent_io.Variant:
        return latent_io.Variant(
            item.path, self.assign_bucket(item), self.backgrounds[item.path], flip
        )

    def _backgrounds(self) -> dict[Path, str]:
        """A fixed background per unique image, so `alternate` splits the set evenly."""
        mode = self.recipe.data.background
        return {im.path: background_for(i, mode) for i, im in enumerate(self.scan.unique_images)}

    def _cache_latents(self, samples: list[ImageItem], console: Console, stop: StopFlag) -> None:
        flips = (False, True) if self.recipe.data.flip_aug else (False,)
        variants = {self._variant(item, f) for item in samples for f in flips}
        # with the disk cache, the main process encodes and the others then read its files
        first = self.accelerator.main_process_first
        with first(), console.status(f"caching latents of {len(variants)} image variants"):
            for _ in self.latent_cache.fill(variants):
                if stop.requested:  # no step of this segment is done: nothing new to save
                    raise StopNow(stop.signum)
        cache = self.latent_cache
        for warning in cache.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
        console.print(
            f"latents of {len(variants)} image variants: {cache.encoded} encoded, "
            f"{cache.reused} from the disk cache"
        )

    def _caption(self, item: ImageItem) -> str:
        data = self.recipe.data
        return process_caption(
            item.caption,
            shuffle=data.shuffle_caption,
            keep_tokens=data.keep_tokens,
            dropout_rate=data.caption_dropout_rate,
            rng=self.data_rng,
        )

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        """Hidden states; cached per caption while the text encoder is frozen."""
        train = self.recipe.train
        tokenizer, encoder = self.base.tokenizer, self.base.text_encoder
        device = self.accelerator.device
        pad_to_longest = train.no_token_padding
        if self.train_te:
            ids = text_encoding.tokenize(
                tokenizer, captions, train.max_token_length, pad_to_longest
            )
            with self.accelerator.autocast():
                return text_encoding.encode(encoder, ids.to(device), train.clip_skip)
        missing = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
        if missing:
            ids = text_encoding.tokenize(tokenizer, missing, train.max_token_length, False)
            with torch.no_grad(), self.accelerator.autocast():
                hidden = text_encoding.encode(encoder, ids.to(device), train.clip_skip)
            self.text_cache.update(zip(missing, hidden, strict=True))
        return torch.stack([self.text_cache[c] for c in captions])

    def _noise(self, shape: torch.Size, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's noise and timestep from its own seed, on the CPU: the same on any
        device, in any process, after any resume."""
        channels = shape[1]
        steps = self.base.noise_scheduler.config.num_train_timesteps
        offset = self.recipe.train.noise_offset
        noises, timesteps = [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(shape[1:], generator=generator)
            if offset:
                noise = noise + offset * torch.randn((channels, 1, 1), generator=generator)
            noises.append(noise)
            timesteps.append(torch.randint(0, steps, (1,), generator=generator))
        return torch.stack(noises), torch.cat(timesteps)

    def _loss_weights(self, items: list[ImageItem], timesteps: torch.Tensor) -> torch.Tensor:
        """Prior-loss weight for reg images, times the min-SNR weight when enabled."""
        train = self.recipe.train
        weights = torch.tensor([train.prior_loss_weight if item.is_reg else 1.0 for item in items])
        if train.min_snr_gamma:
            alphas = self.base.noise_scheduler.alphas_cumprod[timesteps]
            snr = alphas / (1 - alphas)
            weights = weights * torch.clamp(snr, max=train.min_snr_gamma) / snr
        return weights

    # ---------------------------------------------------------------- outputs
    def _lrs(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    def _flush_log(
        self, writer: SummaryWriter, losses: list[torch.Tensor], run_dir: Path
    ) -> tuple[float, float]:
        """Write the scalars of the steps since the last flush, reading the losses back
        in one go; returns the last step's loss and first learning rate."""
        values = torch.stack(losses).tolist() if losses else []
        self._stop_if_diverged(values, run_dir)
        for step, seen, lrs in self._pending:
            if seen:  # (a process may have had no batch yet: a short last one, split)
                writer.add_scalar("loss/step", values[seen - 1], step)
                writer.add_scalar("loss/average", sum(values[:seen]) / seen, step)
            for name, lr in lrs.items():
                writer.add_scalar(f"lr/{name}", lr, step)
        last_lr = next(iter(self._pending[-1][2].values()))
        self._pending = []
        return values[-1] if values else float("nan"), last_lr

    def _stop_if_diverged(self, values: list[float], run_dir: Path) -> None:
        """A NaN or inf loss ends the run: every later step and file would be garbage.
        Losses are read back once per flush (not per step, which would make the host wait
        for the GPU), so the run stops at the next flush and names the first bad step;
        every save is preceded by a flush, so no file holds a diverged network."""
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        if bad is None:
            return
        step = next((step for step, seen, _ in self._pending if seen > bad), self.step)
        lrs = ", ".join(f"{name} LR {lr:.3g}" for name, lr in self._lrs().items())
        raise TrainingDiverged(
            f"{run_dir}: the loss became {values[bad]} at step {step}; training stopped at "
            f"step {self.step}, saving nothing from step {step} on (files saved before it "
            f"are kept). The likely cause is a learning rate too high ({lrs}): lower "
            "train.learning_rate (or unet_lr / text_encoder_lr) and train again"
        )

    def _end_of_epoch(self, epoch: int, result: RunResult, writer: SummaryWriter) -> None:
        names = dict(self.plan.files)
        if self.validator and self.validator.due(epoch, epoch in names):
            self._validate(epoch, result, writer)  # before saving: the final file names it
        if epoch in names:
            self._save(result.run_dir / names[epoch], epoch, result)
            self._drop_old_epochs(result, epoch)
            if epoch < self.plan.epochs:  # a crash after this point resumes from here
                self.epoch_rng = self.data_rng.getstate()
                self._save_state(result.run_dir, self._position(epoch + 1, 0, [], result))
        every = self.recipe.sample.every_n_epochs
        if every and (epoch % every == 0 or epoch == self.plan.epochs):
            self._samples(result.run_dir, epoch, writer)

    def _save(self, path: Path, epoch: int, result: RunResult) -> None:
        meta = build_metadata(
            self.recipe, self.scan, self.plan, self.facts, epoch=epoch, step=self.step
        )
        if epoch == self.plan.epochs and result.recommended_epoch is not None:
            meta[RECOMMENDED_EPOCH_KEY] = str(result.recommended_epoch)
        dtype = SAVE_DTYPES[self.recipe.output.save_precision]
        save_network(self.network, path, meta, dtype)
        result.files.append(path)

    def _validate(self, epoch: int, result: RunResult, writer: SummaryWriter) -> None:
        """Score the network (`validation.py`), log it, keep the recommendation current."""
        validator = self.validator
        validator.log(writer, validator.evaluate(epoch, self.step))
        writer.add_scalar("val/seconds", validator.seconds, self.step)
        files = self._kept_files()
        result.recommended_epoch = validator.recommend(list(files))
        result.validation = validator.report(files, result.recommended_epoch)
        result.validation_s = result.validation["seconds"]

    def _kept_files(self) -> dict[int, str]:
        """Epoch -> file name of the epoch files a finished run keeps (keep_last_n_epochs)."""
        final = self.plan.epochs
        kept = [e for e, _ in self.plan.files if e != final]
        keep = self.recipe.output.keep_last_n_epochs
        kept = kept[-keep:] if keep is not None else kept
        names = dict(self.plan.files)
        return {e: names[e] for e in [*kept, final]}

    def _drop_old_epochs(self, result: RunResult, epoch: int) -> None:
        """keep_last_n_epochs: remove intermediate epoch files beyond the newest N."""
        keep = self.recipe.output.keep_last_n_epochs
        if keep is None or epoch == self.plan.epochs:
            return
        final = result.run_dir / dict(self.plan.files)[self.plan.epochs]
        epoch_files = [f for f in result.files if f != final and "-step" not in f.name]
        for old in epoch_files[:-keep]:
            old.unlink(missing_ok=True)
            result.files.remove(old)

    def _save_interrupted(
        self, result: RunResult, console: Console, at: Position, signum: int
    ) -> None:
        result.stop_signal = signum
        name = f"{self.recipe.output.name}-step{self.step:08d}.safetensors"
        self._save(result.run_dir / name, len(result.epoch_losses), result)
        at.files.append(name)
        self._save_state(result.run_dir, at)  # (after `_save`: only finite weights get here)
        console.print(
            f"[yellow]stopped ({signal_name(signum)}):[/yellow] saved step {self.step} to "
            f"{result.files[-1]}; continue with: train --resume {result.run_dir}"
        )

    def _samples(self, run_dir: Path, epoch: int, writer: SummaryWriter) -> None:
        base = self.base
        images = generate_samples(
            base,
            prompts=self.prompts,
            device=self.accelerator.device,
            dtype=base.unet.dtype,
            clip_skip=self.recipe.train.clip_skip,
            max_token_length=self.recipe.train.max_token_length,
        )
        sample_dir = run_dir / "samples"
        make_folder(sample_dir)
        for index, image in enumerate(images):
            name = sample_file_name(self.recipe.output.name, epoch, self.step, index)
            png = io.BytesIO()
            image.save(png, format="PNG")
            write_atomic(sample_dir / name, [png.getbuffer()])
            array = torch.from_numpy(np.array(image.convert("RGB")))
            writer.add_image(f"samples/{index:02d}", array, self.step, dataformats="HWC")

    @contextmanager
    def _progress(self, console: Console):
        columns = (
            TextColumn("epoch {task.fields[epoch]}/" + str(self.plan.epochs)),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
            SpeedColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            yield progress


class SpeedColumn(ProgressColumn):
    def render(self, task) -> str:
        return f"{task.speed or 0:.2f} it/s"
