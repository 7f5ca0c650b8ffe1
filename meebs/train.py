"""The training loop: a recipe in, LyCORIS network files out.

Read it top to bottom: `train()` scans the data, loads the base model, wraps it in a
LyCORIS network, caches what can be cached, then runs epochs of steps, saving files and
samples as the plan says. Every random choice comes from generators seeded by the
recipe, so the same recipe on the same machine gives the same bytes.
"""

from __future__ import annotations

import io
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
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

from meebs import latents as latent_io
from meebs import text_encoding
from meebs.atomic_write import write_atomic, write_text_atomic
from meebs.compare import input_differences
from meebs.dataset import (
    ImageItem,
    background_for,
    epoch_samples,
    plan_batches,
    process_caption,
)
from meebs.determinism import (
    XFORMERS_BACKWARD,
    NondeterminismWatch,
    apply_determinism,
    nondeterminism_warnings,
    op_warnings,
)
from meebs.errors import MeebsError
from meebs.hash_cache import cached_sha256
from meebs.manifest import (
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
from meebs.metadata import RunFacts, build_metadata, recipe_network
from meebs.models import BaseModel, describe_base, load_base_model
from meebs.network import count_modules, load_network_weights, save_network
from meebs.optim import build_lr_scheduler, build_optimizer, param_groups
from meebs.perf import PerfMeter
from meebs.plan import bucket_assigner, make_plan, print_plan, scan_data
from meebs.recipe import Recipe, recipe_differences, recipe_from_dict
from meebs.runs import log_dir, new_run_dir
from meebs.safetensors_io import file_sha256
from meebs.sampling import generate_samples, recipe_prompts, sample_file_name
from meebs.train_state import (
    STATE_NAME,
    Position,
    TrainState,
    load_state,
    rng_from_json,
    rng_to_json,
    save_state,
)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class RunResult:
    run_dir: Path
    files: list[Path] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    interrupted: bool = False
    perf: dict[str, float] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.run_dir / MANIFEST_NAME


def train(
    recipe: Recipe, console: Console, command: str = "", origin: RecipeOrigin | None = None
) -> RunResult:
    """A new run of `recipe` in a new run folder."""
    loop = prepare(recipe, console)
    run_dir = new_run_dir(recipe)
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
    return run_segment(loop, RunResult(run_dir), manifest, console, command)


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
    loop.restore(state)
    result = RunResult(run_dir, files=[run_dir / name for name in state.position.files])
    result.epoch_losses = list(state.position.epoch_losses)
    console.print(f"resuming {run_dir} at step {loop.step} of {loop.plan.total_steps}")
    return run_segment(loop, result, manifest, console, command)


def prepare(recipe: Recipe, console: Console) -> Loop:
    """Everything before the first step: data, plan, base model, network, optimizer."""
    determinism = apply_determinism(recipe)
    scan = scan_data(recipe)
    plan = make_plan(recipe, scan)
    prompts = recipe_prompts(recipe)  # a bad prompt line stops the run now, not after epoch 1
    print_plan(recipe, scan, plan, console)

    accelerator, fallbacks = make_accelerator(recipe)
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
    console.print(
        f"network: {recipe.network.algo}, {unet_modules} UNet + {te_modules} text-encoder modules"
    )
    if recipe.network.weights:
        load_network_weights(network, Path(recipe.network.weights))
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
    write_manifest(run_dir, manifest)
    # after a resume, events past the saved step (logged before the stop) are dropped
    writer = SummaryWriter(
        log_dir=str(log_dir(recipe, run_dir)), purge_step=resumed_at + 1 if resumed_at else None
    )
    watch = NondeterminismWatch()
    started = time.perf_counter()
    try:
        with stop_on_ctrl_c() as stop, watch.watching():
            loop.run(result, writer, console, stop)
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


def finish_manifest(manifest: dict, loop: Loop, result: RunResult, ops: set[str]) -> None:
    """The run's outcome: status, files and their sha256, losses, times."""
    done = result.steps == loop.plan.total_steps and not result.interrupted
    manifest["status"] = "finished" if done else "interrupted"
    manifest["steps"] = loop.step
    manifest["epoch_losses"] = result.epoch_losses
    manifest["outputs"] = {f.name: file_sha256(f) for f in result.files if f.is_file()}
    samples = sorted((result.run_dir / "samples").glob("*.png"))
    manifest["samples"] = {f.name: file_sha256(f) for f in samples}
    ops_seen = set(manifest["determinism"].get("nondeterministic_ops", [])) | ops
    manifest["determinism"]["nondeterministic_ops"] = sorted(ops_seen)
    manifest["fallbacks"] = list(loop.facts.fallbacks)
    manifest["perf"] = result.perf
    manifest["finished_at"] = utc_now()
    manifest["duration_s"] = round(sum(s.get("duration_s", 0.0) for s in manifest["segments"]), 3)


def make_accelerator(recipe: Recipe) -> tuple[Accelerator, list[str]]:
    """accelerate picks the device; half precision without CUDA falls back to fp32."""
    fallbacks = []
    precision = recipe.train.mixed_precision
    if not torch.cuda.is_available() and precision != "no":
        fallbacks.append(f"mixed_precision {precision} needs a CUDA GPU; training in fp32")
        precision = "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    return accelerator, fallbacks


def set_attention(base: BaseModel, recipe: Recipe, fallbacks: list[str]) -> str:
    if recipe.train.attention == "xformers":
        try:
            base.unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except (ImportError, ModuleNotFoundError, NotImplementedError, ValueError) as exc:
            fallbacks.append(f"xformers unavailable ({exc.__class__.__name__}); using SDPA")
    return "sdpa"


def place_models(base: BaseModel, network, accelerator: Accelerator, recipe, train_te: bool):
    """Frozen weights in the compute dtype on the device; the network stays fp32."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    device = accelerator.device
    for part in (base.unet, base.text_encoder):
        part.to(device)
        if weight_dtype != torch.float32:
            part.to(weight_dtype)
    base.vae.to(device)
    network.to(device)
    network.train()
    if recipe.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if train_te:
            base.text_encoder.gradient_checkpointing_enable()


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
        self.noise_gen = torch.Generator().manual_seed(seed + 1)  # noise, timesteps
        self.vae_gen = torch.Generator().manual_seed(seed + 2)  # latent sampling, uncached
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
        self.step = 0
        self.perf = PerfMeter(acc.device)
        self.epoch_rng = self.data_rng.getstate()
        self.resuming: TrainState | None = None  # set by `restore`
        self.determinism: dict = {}  # set by `prepare`

    # ---------------------------------------------------------------- state
    def _position(
        self, epoch: int, batches_done: int, losses: list[float], result: RunResult
    ) -> Position:
        return Position(
            epoch=epoch,
            batch=batches_done,
            step=self.step,
            epoch_rng=rng_to_json(self.epoch_rng),
            data_rng=rng_to_json(self.data_rng.getstate()),
            epoch_losses=list(result.epoch_losses),
            losses=list(losses),
            files=[f.name for f in result.files],
        )

    def _save_state(self, run_dir: Path, position: Position) -> None:
        generators = {"noise": self.noise_gen.get_state(), "vae": self.vae_gen.get_state()}
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
        self.noise_gen.set_state(saved["noise"])
        self.vae_gen.set_state(saved["vae"])
        torch.set_rng_state(saved["torch"])
        for key, state in saved.items():
            if key.startswith("cuda.") and torch.cuda.is_available():
                torch.cuda.set_rng_state(state, int(key.split(".")[1]))

    # ---------------------------------------------------------------- the loop
    def run(self, result: RunResult, writer: SummaryWriter, console: Console, stop) -> None:
        recipe, plan = self.recipe, self.plan
        samples = epoch_samples(self.scan)
        if recipe.data.cache_latents:
            self._cache_latents(samples, console, stop)
        resuming, self.resuming = self.resuming, None
        at = resuming.position if resuming else None
        if resuming:
            self._restore_generators(resuming.generators)
        with self._progress(console) as progress:
            task = progress.add_task(
                "train", total=plan.total_steps, completed=self.step, epoch=0, loss=0.0, lr=0.0
            )
            accumulate = recipe.train.gradient_accumulation_steps
            for epoch in range(at.epoch if at else 1, plan.epochs + 1):
                if at:
                    self.data_rng.setstate(rng_from_json(at.epoch_rng))
                self.epoch_rng = self.data_rng.getstate()
                batches = self._epoch_plan(samples)
                done, losses = 0, []
                if at:  # the epoch's batch order is rebuilt; skip the batches already done
                    self.data_rng.setstate(rng_from_json(at.data_rng))
                    done, losses, at = at.batch, list(at.losses), None
                for index, batch in enumerate(self._load(batches[done:]), start=done):
                    # the optimizer steps after every `accumulate` batches and after the
                    # epoch's last one, so a short last group never leaks into the next epoch
                    group_start = index - index % accumulate
                    group_size = min(accumulate, plan.batches_per_epoch - group_start)
                    ends_group = index == group_start + group_size - 1
                    loss = self._micro_step(*batch, scale=1 / group_size, optimizer_step=ends_group)
                    losses.append(loss)
                    if not ends_group:
                        continue
                    self.step += 1
                    self.perf.step_done()
                    self._log_step(writer, losses)
                    lr = self.lr_scheduler.get_last_lr()[0]
                    progress.update(task, advance=1, epoch=epoch, loss=loss, lr=lr)
                    if stop.requested:
                        break
                if stop.requested:
                    stopped_at = self._position(epoch, len(losses), losses, result)
                    break
                result.epoch_losses.append(sum(losses) / len(losses))
                writer.add_scalar("loss/epoch", result.epoch_losses[-1], epoch)
                self._end_of_epoch(epoch, result, writer)
        result.steps = self.step
        result.perf = self.perf.summary()
        console.print(self.perf.line())
        if stop.requested:
            self._save_interrupted(result, console, stopped_at)
        else:
            console.print(f"[green]done:[/green] {len(result.files)} file(s) in {result.run_dir}")

    def _micro_step(
        self, variants, items: list[ImageItem], pixels, *, scale: float, optimizer_step: bool
    ) -> float:
        """Forward and backward on one batch (its loss scaled by `scale`, 1 / the batches
        accumulated); with `optimizer_step`, clip, step and clear the gradients."""
        base, device = self.base, self.accelerator.device
        if pixels is None:
            latents = self.latent_cache.batch(variants)
        else:
            latents = latent_io.encode(base.vae, pixels, self.vae_gen)
        latents = latents.to(device)
        hidden = self._encode_text([self._caption(item) for item in items])
        noise, timesteps = self._noise(latents)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps.cpu()).to(device)
        with self.accelerator.autocast():
            pred = base.unet(noisy, timesteps.to(device), hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (loss * self._loss_weights(items, timesteps).to(device)).mean()
        self.accelerator.backward(loss * scale)
        if optimizer_step:
            max_norm = self.recipe.train.max_grad_norm
            if max_norm > 0:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                self.accelerator.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    # ---------------------------------------------------------------- data
    def _epoch_plan(self, samples: list[ImageItem]) -> list[tuple[list, list[ImageItem]]]:
        """(variants, items) per batch: the epoch's random order and flips, chosen here."""
        batches = plan_batches(
            samples, self.assign_bucket, self.recipe.train.batch_size, self.data_rng
        )
        flip = self.recipe.data.flip_aug
        return [
            ([self._variant(item, flip and self.data_rng.random() < 0.5) for item in batch], batch)
            for batch in batches
        ]

    def _load(self, batches: list[tuple[list, list[ImageItem]]]) -> Iterator[tuple]:
        """(variants, items, pixels or None) per batch; pixels are read ahead by workers."""
        if self.recipe.data.cache_latents:
            for variants, items in batches:
                yield variants, items, None
            return
        loader = latent_io.pixel_batches([v for v, _ in batches], self.recipe.data.num_workers)
        for (variants, items), pixels in zip(batches, loader, strict=True):
            yield variants, items, pixels

    def _variant(self, item: ImageItem, flip: bool) -> latent_io.Variant:
        return latent_io.Variant(
            item.path, self.assign_bucket(item), self.backgrounds[item.path], flip
        )

    def _backgrounds(self) -> dict[Path, str]:
        """A fixed background per unique image, so `alternate` splits the set evenly."""
        mode = self.recipe.data.background
        return {im.path: background_for(i, mode) for i, im in enumerate(self.scan.unique_images)}

    def _cache_latents(self, samples: list[ImageItem], console: Console, stop) -> None:
        flips = (False, True) if self.recipe.data.flip_aug else (False,)
        variants = {self._variant(item, f) for item in samples for f in flips}
        with console.status(f"caching latents of {len(variants)} image variants"):
            for _ in self.latent_cache.fill(variants):
                if stop.requested:
                    raise KeyboardInterrupt
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

    def _noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps from the run's own generator (on the CPU: same on any device)."""
        batch, channels = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=self.noise_gen)
        offset = self.recipe.train.noise_offset
        if offset:
            noise = noise + offset * torch.randn((batch, channels, 1, 1), generator=self.noise_gen)
        steps = self.base.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=self.noise_gen)
        return noise.to(latents.device, latents.dtype), timesteps

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
    def _log_step(self, writer: SummaryWriter, losses: list[float]) -> None:
        writer.add_scalar("loss/step", losses[-1], self.step)
        writer.add_scalar("loss/average", sum(losses) / len(losses), self.step)
        for group in self.optimizer.param_groups:
            writer.add_scalar(f"lr/{group['name']}", group["lr"], self.step)

    def _end_of_epoch(self, epoch: int, result: RunResult, writer: SummaryWriter) -> None:
        names = dict(self.plan.files)
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
        dtype = SAVE_DTYPES[self.recipe.output.save_precision]
        save_network(self.network, path, meta, dtype)
        result.files.append(path)

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

    def _save_interrupted(self, result: RunResult, console: Console, at: Position) -> None:
        result.interrupted = True
        name = f"{self.recipe.output.name}-step{self.step:08d}.safetensors"
        self._save(result.run_dir / name, len(result.epoch_losses), result)
        at.files.append(name)
        self._save_state(result.run_dir, at)
        console.print(
            f"[yellow]stopped:[/yellow] saved step {self.step} to {result.files[-1]}; "
            f"continue with: train --resume {result.run_dir}"
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
        sample_dir.mkdir(exist_ok=True)
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


class StopFlag:
    requested = False


@contextmanager
def stop_on_ctrl_c():
    """First Ctrl-C: finish the current step, save it, stop. Second: stop at once."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
