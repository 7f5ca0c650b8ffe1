"""One run's loop: epochs of batches through the step, and what happens between them.

`Loop.run` reads top to bottom: fill the latent cache, restore a resumed position, then
for each epoch its batches (`epochs.py`) through the step's math (`step.py`), a log
flush every `log_every_n_steps` (one host-device sync), and at the epoch's end
validation, the epoch file, the resume state and the samples. A stop request (Ctrl-C,
SIGTERM) ends it after the current step with a `-step` file and a resume state.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from meebs.data import latents as latent_io
from meebs.data.folders import epoch_samples
from meebs.errors import TrainingDiverged
from meebs.files.atomic_write import make_folder, write_atomic, write_text_atomic
from meebs.files.hash_cache import cached_sha256
from meebs.models.sampling import generate_samples, sample_file_name
from meebs.network.resume_tensors import load_train_state, train_state
from meebs.network.save import SAVE_DTYPES, network_state_dict, refuse_non_finite, save_network
from meebs.plan.metadata import RECOMMENDED_EPOCH_KEY, build_metadata
from meebs.runs.manifest import (
    MANIFEST_NAME,
    data_manifest,
)
from meebs.training.epochs import EpochData
from meebs.training.perf import PerfMeter
from meebs.training.progress import progress_bar
from meebs.training.step import Batch, StepMath
from meebs.training.stop import StopFlag, StopNow, signal_name
from meebs.training.train_state import (
    STATE_NAME,
    Position,
    TrainState,
    rng_from_json,
    rng_to_json,
    save_state,
)
from meebs.training.validation import RESULT_NAME as VALIDATION_NAME
from meebs.training.validation import Validator

RANK_SEED_STRIDE = 1000  # process r's VAE sampling generator: seed + 1000 r + 2


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


class Loop:
    """State of one run's optimisation; `run()` is the loop itself."""

    def __init__(
        self, recipe, scan, plan, base, network, optimizer, lr_scheduler, acc, facts, prompts
    ):
        self.recipe, self.scan, self.plan, self.base = recipe, scan, plan, base
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.accelerator, self.facts, self.prompts = acc, facts, prompts
        seed = recipe.train.seed
        # noise and timesteps are seeded per sample (`epochs.noise_seed`); VAE sampling per
        # process
        rank_seed = seed + RANK_SEED_STRIDE * acc.process_index
        self.vae_gen = torch.Generator().manual_seed(rank_seed + 2)  # latent sampling, uncached
        # each image hashed once: for the manifest and to address its cached latents
        self.image_sha256 = {im.path: cached_sha256(im.path) for im in scan.unique_images}
        self.data_manifest = data_manifest(scan, self.image_sha256)
        store = latent_io.latent_store() if recipe.data.cache_latents_to_disk else None
        self.latent_cache = latent_io.LatentCache(
            base.vae, base.sha256, seed, store, self.image_sha256
        )
        self.data = EpochData(recipe, scan, plan, acc, self.latent_cache)
        train_te = bool(network.text_encoder_loras) and recipe.text_encoder_lr > 0
        self.math = StepMath(
            recipe, base, optimizer, lr_scheduler, acc, self.latent_cache, self.vae_gen, train_te
        )
        self.step = 0
        self._pending: list[tuple[int, int, dict[str, float]]] = []  # steps not yet logged
        self.perf = PerfMeter(acc.device)
        self.epoch_rng = self.data.rng.getstate()
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
            network=train_state(self.network),
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            generators=generators,
        )
        save_state(run_dir / STATE_NAME, state)

    def restore(self, state: TrainState) -> None:
        """Load a saved state; `run` then continues from its position."""
        load_train_state(self.network, state.network)
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
            self.data.cache_latents(samples, console, stop)
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
        if at and at.batch == 0 and at.epoch > 1:  # a stop between an epoch and its outputs
            self._epoch_outputs(at.epoch - 1, result, writer)
        with progress_bar(console, plan.epochs) as progress:
            task = progress.add_task(
                "train", total=plan.total_steps, completed=self.step, epoch=0, loss=0.0, lr=0.0
            )
            for epoch in range(at.epoch if at else 1, plan.epochs + 1):
                if at:
                    self.data.rng.setstate(rng_from_json(at.epoch_rng))
                self.epoch_rng = self.data.rng.getstate()
                rounds = self.data.rounds(samples, epoch)
                done, losses = 0, []
                if at:  # the epoch's rounds are rebuilt; skip those already done
                    device = self.accelerator.device
                    losses = [torch.tensor(v, device=device) for v in at.losses]
                    done, at = at.batch, None
                for index, batch in enumerate(self.data.load(rounds[done:]), start=done):
                    group = self.data.group(index)
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
        accumulated rounds); with `optimizer_step`, the step itself (`step.py`). None when
        this process has no samples in the round (a bucket's short last batch, on several
        processes)."""
        loss = None
        if items is not None:
            batch = Batch(variants, items, captions, noise_seeds)
            loss = self.math.forward_backward(batch, pixels, len(items) / in_step)
        if optimizer_step:
            self.math.optimizer_step()
        return loss

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
        """Validation, then the resume state, then the epoch's file and samples.

        The state comes first because it holds the very weights the epoch file is made
        of: a process killed after it (SIGKILL, a power cut) resumes by writing what is
        missing of this epoch's outputs, never by training the epoch again.
        """
        names = dict(self.plan.files)
        if self.validator and self.validator.due(epoch, epoch in names):
            self._validate(epoch, result, writer)  # before saving: the final file names it
        if epoch in names and epoch < self.plan.epochs:  # a crash after this resumes here
            # the file's NaN/inf check first: a state, like a file, never holds them
            dtype = SAVE_DTYPES[self.recipe.output.save_precision]
            saved = network_state_dict(self.network, dtype)
            refuse_non_finite(saved, result.run_dir / names[epoch], self.network.state_dict())
            self.epoch_rng = self.data.rng.getstate()
            self._save_state(result.run_dir, self._position(epoch + 1, 0, [], result))
        self._epoch_outputs(epoch, result, writer)

    def _epoch_outputs(self, epoch: int, result: RunResult, writer: SummaryWriter) -> None:
        """The epoch's network file and samples, where planned; after a resume, only those
        missing (each is written under a temporary name and renamed, so one that exists
        is complete)."""
        names = dict(self.plan.files)
        if epoch in names:
            path = result.run_dir / names[epoch]
            if path.exists():
                result.files.append(path)
            else:
                self._save(path, epoch, result)
            self._drop_old_epochs(result, epoch)
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
        sample_dir = run_dir / "samples"
        names = [
            sample_file_name(self.recipe.output.name, epoch, self.step, index)
            for index in range(len(self.prompts))
        ]
        if all((sample_dir / name).exists() for name in names):
            return  # drawn before a stop
        base = self.base
        images = generate_samples(
            base,
            prompts=self.prompts,
            device=self.accelerator.device,
            dtype=base.unet.dtype,
            clip_skip=self.recipe.train.clip_skip,
            max_token_length=self.recipe.train.max_token_length,
        )
        make_folder(sample_dir)
        for index, (name, image) in enumerate(zip(names, images, strict=True)):
            png = io.BytesIO()
            image.save(png, format="PNG")
            write_atomic(sample_dir / name, [png.getbuffer()])
            array = torch.from_numpy(np.array(image.convert("RGB")))
            writer.add_image(f"samples/{index:02d}", array, self.step, dataformats="HWC")
