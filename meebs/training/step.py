"""The math of one optimizer step, and nothing else (nanoGPT's loop, for a LoHA).

For each batch: latents (cached or encoded), the captions' hidden states, one noise and
one timestep per sample from its own seed, the noised latents, the UNet's prediction, the
per-sample MSE weighted (prior loss for class images, min-SNR), backward. After the
step's last batch: gradients summed over processes, clipped, the optimizer and the LR
schedule stepped, gradients cleared.

Epochs, data order, saving, resume, validation, samples, logs and progress are the run's
business (`train.py`); the run hands this class ready batches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from meebs.data import latents as latent_io
from meebs.data.folders import ImageItem
from meebs.models import text_encoding
from meebs.models.base import BaseModel
from meebs.recipe.schema import Recipe


class Batch(NamedTuple):
    """One process's samples of one round, with every random choice already made."""

    variants: list[latent_io.Variant]
    items: list[ImageItem]
    captions: list[str]
    noise_seeds: list[int]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait for the GPU's queue
    (pinned memory, asynchronous copy); a plain move elsewhere."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class StepMath:
    """Forward, loss and backward of a batch; the optimizer step after the last one."""

    def __init__(
        self,
        recipe: Recipe,
        base: BaseModel,
        optimizer,
        lr_scheduler,
        accelerator: Accelerator,
        latent_cache: latent_io.LatentCache,
        vae_gen: torch.Generator,
        train_te: bool,
    ):
        self.train, self.base = recipe.train, base
        self.optimizer, self.lr_scheduler, self.accelerator = optimizer, lr_scheduler, accelerator
        self.latent_cache, self.vae_gen, self.train_te = latent_cache, vae_gen, train_te
        self.text_cache: dict[str, torch.Tensor] = {}  # caption -> hidden states (frozen TE)
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(accelerator.device)

    def forward_backward(self, batch: Batch, pixels, scale: float) -> torch.Tensor:
        """Backward of the batch's loss times `scale` (its share of the step's samples);
        returns the loss, left on the device (reading it is a sync)."""
        device = self.accelerator.device
        if pixels is None:
            latents = self.latent_cache.batch(batch.variants)
        else:
            latents = latent_io.encode(self.base.vae, pixels, self.vae_gen)
        latents = latents.to(device)
        hidden = self.encode_text(batch.captions)
        noise, timesteps = self.noise(latents.shape, batch.noise_seeds)
        weights = self.loss_weights(batch.items, timesteps)
        noise, timesteps, weights = (to_device(t, device) for t in (noise, timesteps, weights))
        losses = self.denoising_losses(latents, noise.to(latents.dtype), timesteps, hidden)
        loss = (losses * weights).mean()
        self.accelerator.backward(loss * scale)
        return loss.detach()

    def optimizer_step(self) -> None:
        """Sum the processes' gradients, clip, step the optimizer and the schedule, clear."""
        if self.accelerator.num_processes > 1:
            self._sum_gradients()
        max_norm = self.train.max_grad_norm
        if max_norm > 0:
            self.accelerator.clip_grad_norm_(self._params(), max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def denoising_losses(self, latents, noise, timesteps, hidden) -> torch.Tensor:
        """The UNet's per-sample MSE at predicting `noise` from the noised latents, all on
        the device. The noising is diffusers' `add_noise` formula on a device copy of the
        schedule: `add_noise` copies the schedule to the device on every call, and on a GPU
        such a copy makes the host wait for every queued kernel."""
        alpha = self.alphas_cumprod.to(latents.dtype)[timesteps].view(-1, 1, 1, 1)
        noisy = alpha**0.5 * latents + (1 - alpha) ** 0.5 * noise
        with self.accelerator.autocast():
            pred = self.base.unet(noisy, timesteps, hidden).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Hidden states; cached per caption while the text encoder is frozen."""
        train, tokenizer, encoder = self.train, self.base.tokenizer, self.base.text_encoder
        device = self.accelerator.device
        if self.train_te:
            ids = text_encoding.tokenize(
                tokenizer, captions, train.max_token_length, train.no_token_padding
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

    def noise(self, shape: torch.Size, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's noise and timestep from its own seed, on the CPU: the same on any
        device, in any process, after any resume."""
        channels = shape[1]
        steps = self.base.noise_scheduler.config.num_train_timesteps
        offset = self.train.noise_offset
        noises, timesteps = [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(shape[1:], generator=generator)
            if offset:
                noise = noise + offset * torch.randn((channels, 1, 1), generator=generator)
            noises.append(noise)
            timesteps.append(torch.randint(0, steps, (1,), generator=generator))
        return torch.stack(noises), torch.cat(timesteps)

    def loss_weights(self, items: list[ImageItem], timesteps: torch.Tensor) -> torch.Tensor:
        """Prior-loss weight for reg images, times the min-SNR weight when enabled."""
        train = self.train
        weights = torch.tensor([train.prior_loss_weight if item.is_reg else 1.0 for item in items])
        if train.min_snr_gamma:
            alphas = self.base.noise_scheduler.alphas_cumprod[timesteps]
            snr = alphas / (1 - alphas)
            weights = weights * torch.clamp(snr, max=train.min_snr_gamma) / snr
        return weights

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _sum_gradients(self) -> None:
        """All processes' gradients summed (each loss was already divided by the batches of
        the whole step), in one all-reduce of one flat buffer.

        This is what DDP does, without its forward wrapper: our forward runs through the
        UNet and text encoder, which DDP would not see as the network's module. A process
        that had no batch contributes zeros.
        """
        params = self._params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "sum")
        for param, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
            param.grad = chunk.view_as(param)
