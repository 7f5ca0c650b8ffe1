"""The meeb scorer: a small CNN that says whether a 64 px picture shows a meeb, a person,
or something else. It is how the demo measures what a LoHA learned (the share of samples
that are meebs), a test instrument and never a training signal.

It is trained on fresh drawings from the generators, half of them passed through the tiny
VAE, because the samples it judges come out of that VAE. Two variants are trained:

- `colour` sees RGB;
- `shape` sees luminance only, so a VAE that shifts a meeb's purple cannot hide a meeb
  that was learned as a shape.

Augmentations (shifts, flips, blur, noise) keep it from keying on pixel-exact details that
no diffusion sample reproduces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from meebs.tiny.pretrain_data import SCORER_LABELS, VAE_KINDS, draw_many, scorer_label, to_tensor

POOL = 8000
ROUND_TRIPS = 2000
MAX_JITTER = 0.6
BATCH = 64
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


class MeebScorer(nn.Module):
    """Pictures halved to 32 px, three conv blocks, global average pooling, one linear
    layer: ~60k parameters, cheap enough to train in a minute on 2 cores."""

    def __init__(self, grayscale: bool) -> None:
        super().__init__()
        self.grayscale = grayscale
        widths = (1 if grayscale else 3, 24, 48, 96)
        layers: list[nn.Module] = [nn.AvgPool2d(2)]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Conv2d(width_in, width_out, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], len(SCORER_LABELS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images in [-1, 1], (N, 3, H, W)."""
        if self.grayscale:
            images = (images * LUMA.to(images.device)).sum(dim=1, keepdim=True)
        return self.head(self.features(images).mean(dim=(2, 3)))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> list[str]:
        """The label of each image."""
        self.eval()
        return [SCORER_LABELS[index] for index in self(images).argmax(dim=1).tolist()]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {key: tensor.contiguous() for key, tensor in self.state_dict().items()}
        save_file(state, path, metadata={"grayscale": str(self.grayscale).lower()})

    @classmethod
    def load(cls, path: Path) -> MeebScorer:
        with safe_open(path, "pt") as handle:
            grayscale = handle.metadata()["grayscale"] == "true"
        scorer = cls(grayscale)
        scorer.load_state_dict(load_file(path))
        return scorer.eval()


@torch.no_grad()
def vae_round_trip(
    vae: AutoencoderKL,
    images: torch.Tensor,
    device: torch.device,
    jitter: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`images` encoded to latent means and decoded again, as a sample would come out.

    `jitter` (one number per image) adds that much Gaussian noise, relative to the spread
    of the latents, before decoding: the murky colour noise an undertrained UNet leaves in
    its samples, which the scorer must see past.
    """
    out = []
    for start in range(0, len(images), 128):
        latents = vae.encode(images[start : start + 128].to(device)).latent_dist.mean
        if jitter is not None:
            amount = jitter[start : start + 128].to(device).view(-1, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            latents = latents + amount * latents.std() * noise
        out.append(vae.decode(latents).sample.clamp(-1, 1).cpu())
    return torch.cat(out)


def labelled_pool(
    vae: AutoencoderKL, seed: int, device: torch.device, pool: int, round_trips: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pool` fresh drawings (kinds in turn) and `round_trips` more passed through the VAE
    (~15 ms a picture on 2 cores, hence fewer) with up to `MAX_JITTER` latent noise, with
    their labels."""
    drawings = draw_many(seed, VAE_KINDS, pool + round_trips, 64)
    images = to_tensor(drawings)
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.rand(round_trips, generator=generator) * MAX_JITTER
    images[pool:] = vae_round_trip(vae, images[pool:], device, jitter, generator)
    labels = torch.tensor([scorer_label(drawing.kind) for drawing in drawings])
    return images, labels


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift by up to 6 px, mirror half, blur a third, add a little noise."""
    dx, dy = torch.randint(-6, 7, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    blur = torch.rand(len(images), generator=generator) < 0.33
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    images = torch.where(blur[:, None, None, None], blurred, images)
    noise = torch.randn(images.shape, generator=generator) * 0.05
    return (images + noise).clamp(-1, 1)


def train_scorers(
    vae: AutoencoderKL,
    seed: int,
    steps: int,
    device: torch.device,
    log: Callable[[str], None] = print,
    pool: int = POOL,
    round_trips: int = ROUND_TRIPS,
) -> dict[str, MeebScorer]:
    """Both variants, `colour` and `shape`, trained on one pool of fresh drawings."""
    images, labels = labelled_pool(vae, seed, device, pool, round_trips)
    return {
        name: _train(MeebScorer(grayscale), images, labels, pool, seed + 1, steps, device, log)
        for name, grayscale in (("colour", False), ("shape", True))
    }


def _train(
    scorer: MeebScorer,
    images: torch.Tensor,
    labels: torch.Tensor,
    pool: int,
    seed: int,
    steps: int,
    device: torch.device,
    log: Callable[[str], None],
) -> MeebScorer:
    """Half of each batch clean drawings (`images[:pool]`), half VAE round trips."""
    generator = torch.Generator().manual_seed(seed)
    scorer = scorer.to(device)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=2e-3)
    scorer.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps)
        clean = torch.randint(0, pool, (BATCH // 2,), generator=generator)
        round_trip = torch.randint(pool, len(images), (BATCH // 2,), generator=generator)
        picks = torch.cat([clean, round_trip])
        batch = _augment(images[picks], generator).to(device)
        loss = F.cross_entropy(scorer(batch), labels[picks].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 300 == 0 or step == steps - 1:
            name = "shape" if scorer.grayscale else "colour"
            log(f"scorer ({name}) step {step:5d}/{steps}  loss {loss.item():.4f}")
    return scorer.cpu().eval()


@torch.no_grad()
def evaluate_scorers(
    scorers: dict[str, MeebScorer],
    vae: AutoencoderKL,
    seed: int,
    device: torch.device,
    per_kind: int = 100,
) -> dict[str, float]:
    """Held-out accuracy of each scorer on `per_kind` fresh drawings of each kind, clean,
    and the same drawings through the VAE: `scorer_{name}_accuracy_{clean,vae}`."""
    drawings = draw_many(seed, VAE_KINDS, per_kind * len(VAE_KINDS), 64)
    clean = to_tensor(drawings)
    labels = torch.tensor([scorer_label(drawing.kind) for drawing in drawings])
    round_trip = vae_round_trip(vae, clean, device)
    accuracy = {}
    for name, scorer in scorers.items():
        for variant, images in (("clean", clean), ("vae", round_trip)):
            predicted = scorer(images).argmax(dim=1)
            right = (predicted == labels).float().mean().item()
            accuracy[f"scorer_{name}_accuracy_{variant}"] = right
    return accuracy
