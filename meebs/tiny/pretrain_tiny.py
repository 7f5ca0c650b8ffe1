"""`make pretrain-tiny`: teach the tiny SD 1.5-shaped base to draw, on 2 CPU cores.

With random weights the tiny base can only show that a loss goes down. This script trains
it, from scratch and deterministically, on drawings made fresh by the project's
generators (`meebs.tiny.pretrain_data`), so a demo LoHA has something to steer:

1. the VAE (a 4x compressor, 64 px -> 16 x 16 x 4 latents) learns to reconstruct people,
   shapes, made-up creatures and meebs; its latent scale is measured, as SD's 0.18215 was;
2. the meeb scorer (`meebs.tiny.meeb_scorer`) is trained on drawings, half of them passed
   through that VAE: the demo's instrument, never a training signal;
3. the UNet and the text encoder learn, together, to draw people, shapes and creatures
   named by made-up words, from latents of the VAE as saved (fp16). They never see a meeb.

Every random choice comes from `config.seed`, torch runs with `config.threads` threads
and deterministic kernels, and the weights are written as fp16 safetensors in a diffusers
folder, so a rerun on the same kind of CPU writes the same bytes. The folder is compared
with the committed `builtin: tiny-trained` at the end (`--install` replaces it).

Run: `python -m meebs.tiny.pretrain_tiny [--out DIR] [--install] [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from meebs.models.base import noise_scheduler
from meebs.models.text_encoding import encode, tokenize
from meebs.models.tokenizer import clip_tokenizer
from meebs.runs.manifest import hardware, hardware_class
from meebs.tiny.meeb_scorer import evaluate_scorers, train_scorers
from meebs.tiny.pretrain_data import CLASS_KINDS, VAE_KINDS, draw_many, to_tensor
from meebs.tiny.pretrain_record import (
    ASSET_DIR,
    compare_with,
    file_hashes,
    folder_sha256_of,
    generator_version,
    install,
    save_folder,
    write_record,
)


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of the pretraining; the defaults made the committed weights."""

    seed: int = 1126
    threads: int = 2
    size: int = 64
    # VAE: 3 blocks = 4x downsampling, trained on random crops (4x cheaper per step, and a
    # convolutional VAE does not care where in the picture a patch came from)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # scorer (see meebs.tiny.meeb_scorer)
    scorer_steps: int = 1200
    scorer_pool: int = 8000
    scorer_round_trips: int = 2000
    eval_per_kind: int = 100
    """Held-out drawings per kind for the scorer's accuracy (PSNR uses 64)."""
    # UNet + text encoder
    unet_channels: tuple[int, ...] = (64, 128)
    text_width: int = 64
    text_layers: int = 2
    pool_size: int = 12000
    unet_steps: int = 1100
    unet_batch: int = 32
    unet_lr: float = 2e-3
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    warmup_steps: int = 50


@dataclass
class Report:
    """The measured figures (PSNR, scorer accuracy) and each stage's seconds."""

    figures: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- architecture
def part_configs(config: PretrainConfig) -> dict[str, dict]:
    """The diffusers / transformers configs of the three parts (SD 1.5's shape, small).
    The VAE's latent scale is 1 until the VAE is trained and its latents are measured."""
    vae_blocks = len(config.vae_channels)
    unet_blocks = len(config.unet_channels)
    return {
        "vae": {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(config.vae_channels),
            "down_block_types": ["DownEncoderBlock2D"] * vae_blocks,
            "up_block_types": ["UpDecoderBlock2D"] * vae_blocks,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "sample_size": config.size,
            "scaling_factor": 1.0,
        },
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": list(config.unet_channels),
            "down_block_types": ["CrossAttnDownBlock2D"] * (unet_blocks - 1) + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (unet_blocks - 1),
            "cross_attention_dim": config.text_width,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "sample_size": config.size // 2 ** (vae_blocks - 1),
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_act": "quick_gelu",
            "hidden_size": config.text_width,
            "intermediate_size": config.text_width * 4,
            "num_attention_heads": 4,
            "num_hidden_layers": config.text_layers,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
            "projection_dim": config.text_width,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
    }


def build_parts(
    configs: dict[str, dict],
) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """Fresh parts with the libraries' own initialisation (seed torch first)."""
    vae = AutoencoderKL.from_config(configs["vae"])
    unet = UNet2DConditionModel.from_config(configs["unet"])
    text = {key: value for key, value in configs["text_encoder"].items() if key != "architectures"}
    return vae, unet, CLIPTextModel(CLIPTextConfig(**text))


def fp16_round_trip(module: torch.nn.Module) -> None:
    """Round every weight to fp16 and back, so later stages see the weights as saved."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


# ---------------------------------------------------------------------- training
def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(
    vae: AutoencoderKL, config: PretrainConfig, device: torch.device, log: Callable[[str], None]
) -> None:
    """Reconstruction (MSE + L1) with a whisper of KL, on random crops of fresh drawings."""
    steps, batch, crop = config.vae_steps, config.vae_batch, config.vae_crop
    images = to_tensor(draw_many(config.seed + 1, VAE_KINDS, steps * batch // 4, config.size))
    generator = torch.Generator().manual_seed(config.seed + 2)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, config.vae_lr, config.warmup_steps)
        picks = torch.randint(0, len(images), (batch,), generator=generator)
        top, left = torch.randint(0, config.size - crop + 1, (2,), generator=generator).tolist()
        x = images[picks, :, top : top + crop, left : left + crop].to(device)
        posterior = vae.encode(x).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator
        ).to(device)
        out = vae.decode(latents).sample
        kl = posterior.kl().mean() / latents[0].numel()
        loss = F.mse_loss(out, x) + 0.1 * F.l1_loss(out, x) + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps}  loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, images: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and standard deviations of `images`, unscaled, in batches of 256."""
    means, stds = [], []
    for start in range(0, len(images), 256):
        posterior = vae.encode(images[start : start + 256].to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: Sequence[str],
    config: PretrainConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> None:
    """Epsilon prediction on SD 1.5's schedule, min-SNR weighted, UNet and text encoder
    trained together; a share of captions is dropped so classifier-free guidance works."""
    means, stds = latents
    tokenizer = clip_tokenizer()
    ids = tokenize(tokenizer, list(captions), 75, pad_to_longest=False)
    empty = tokenize(tokenizer, [""], 75, pad_to_longest=False)[0]
    alphas = noise_scheduler().alphas_cumprod.to(device)
    generator = torch.Generator().manual_seed(config.seed + 3)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-2)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    steps, batch = config.unet_steps, config.unet_batch
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, config.unet_lr, config.warmup_steps)
        picks = torch.randint(0, len(means), (batch,), generator=generator)
        sample_noise = torch.randn(means[picks].shape, generator=generator)
        noise = torch.randn(means[picks].shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < config.caption_dropout
        x0 = (means[picks] + stds[picks] * sample_noise).to(device)
        noise, timesteps = noise.to(device), timesteps.to(device)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        batch_ids = torch.where(dropped[:, None], empty[None], ids[picks]).to(device)
        hidden = encode(text_encoder, batch_ids, clip_skip=1)
        pred = unet(noisy, timesteps, hidden).sample
        snr = alpha.flatten() / (1 - alpha.flatten())
        weights = torch.clamp(snr, max=config.min_snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step:5d}/{steps}  loss {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, seed: int, size: int, device: torch.device) -> dict[str, float]:
    """PSNR (dB, pixels in 0..1) of the VAE round trip (latent mean) per drawing kind,
    on 64 drawings of each kind that training never drew."""
    figures = {}
    for kind in VAE_KINDS:
        images = to_tensor(draw_many(seed, (kind,), 64, size)).to(device)
        out = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((out + 1) / 2, (images + 1) / 2).item()
        figures[f"vae_psnr_{kind}"] = 10 * math.log10(1 / mse)
    return figures


# ---------------------------------------------------------------------- the run
def pretrain(
    config: PretrainConfig,
    out: Path,
    device: torch.device,
    log: Callable[[str], None] = print,
    command: str = "make pretrain-tiny",
) -> Report:
    """Run the three stages, write the folder to `out` and return the figures; `command`
    is what the record and model card say made it."""
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    report = Report()
    configs = part_configs(config)
    vae, unet, text_encoder = build_parts(configs)
    vae, unet, text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)

    started = time.perf_counter()
    train_vae(vae, config, device, log)
    fp16_round_trip(vae)
    report.seconds["vae"] = time.perf_counter() - started
    report.figures.update(vae_psnr(vae, config.seed + 10, config.size, device))

    started = time.perf_counter()
    scorers = train_scorers(
        vae,
        config.seed + 20,
        config.scorer_steps,
        device,
        log,
        config.scorer_pool,
        config.scorer_round_trips,
    )
    figures = evaluate_scorers(scorers, vae, config.seed + 21, device, config.eval_per_kind)
    report.figures.update(figures)
    report.seconds["scorer"] = time.perf_counter() - started

    started = time.perf_counter()
    drawings = draw_many(config.seed + 4, CLASS_KINDS, config.pool_size, config.size)
    means, stds = encode_pool(vae, to_tensor(drawings), device)
    scale = round(1 / means.std().item(), 5)
    configs["vae"]["scaling_factor"] = scale
    vae.register_to_config(scaling_factor=scale)
    captions = [drawing.caption for drawing in drawings]
    train_unet(unet, text_encoder, (means * scale, stds * scale), captions, config, device, log)
    report.seconds["unet"] = time.perf_counter() - started

    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    save_folder(out, parts, configs, scorers)
    record = {
        "command": command,
        "config": dataclasses.asdict(config),
        "generator_version": generator_version(),
        "torch": torch.__version__,
        "hardware_class": hardware_class(hardware(device)),
        "folder_sha256": folder_sha256_of(out),
        "figures": report.figures,
        "seconds": report.seconds,
        "files": file_hashes(out),
    }
    write_record(out, record)
    return report


def _override(config: PretrainConfig, assignments: Sequence[str]) -> PretrainConfig:
    changes = {}
    fields = {item.name: item for item in dataclasses.fields(config)}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {assignment}: unknown key {key!r}; keys: {', '.join(fields)}")
        current = getattr(config, key)
        if isinstance(current, tuple):
            changes[key] = tuple(int(part) for part in value.split(","))
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(config, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meebs.tiny.pretrain_tiny", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny-trained"))
    parser.add_argument("--install", action="store_true", help=f"then copy it to {ASSET_DIR}")
    parser.add_argument("--device", default="cpu", help="cpu (the committed bytes) or cuda")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = _override(PretrainConfig(), args.set)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m meebs.tiny.pretrain_tiny " + " ".join(given)
    report = pretrain(config, args.out, torch.device(args.device), command=command.strip())
    for name, value in {**report.figures, **report.seconds}.items():
        print(f"{name:32s} {value:10.4f}")
    same = compare_with(args.out, ASSET_DIR)
    if args.install:
        install(args.out, ASSET_DIR)
        print(f"installed into {ASSET_DIR}: set models.TINY_TRAINED_SHA256 to its folder_sha256")
    return 0 if same or args.install else 1


if __name__ == "__main__":
    sys.exit(main())
