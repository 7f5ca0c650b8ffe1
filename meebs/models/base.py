"""The base model: the frozen SD 1.x parts a LoHA trains against, and what identifies them.

What the three ways of loading one share (`meebs.models.loading` picks the way): the
`BaseModel` they return, the sha256 a recipe pins and how each source is hashed, the SD 1.5
training schedule, the configs shipped in `meebs/configs/`, and the one-line errors for a
wrong pin or a checkpoint that is not SD 1.x.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from meebs.errors import ModelError
from meebs.files.hash_cache import cached_sha256

CONFIGS = Path(__file__).parent.parent / "configs"
SD15_CONFIGS = CONFIGS / "sd15"
TINY_CONFIGS = CONFIGS / "tiny"
SCHEDULER_CONFIG = SD15_CONFIGS / "scheduler" / "scheduler_config.json"

# kohya's ss_sd_model_hash reads 64 KiB at offset 1 MiB.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000
_FIX = "point model.path at an SD 1.5 checkpoint"


@dataclass
class BaseModel:
    """The frozen SD 1.x parts and what identifies them in manifests and adapter metadata.

    `sha256` is what a recipe pins; `legacy_hash` is kohya's `ss_sd_model_hash` (None for
    folders and built-ins, which kohya never hashes). The parts are switched to fp32,
    eval mode and requires_grad False here, so no loader can forget it.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    sha256: str
    name: str
    legacy_hash: str | None
    source: str

    def __post_init__(self) -> None:
        for part in (self.unet, self.vae, self.text_encoder):
            part.float().eval().requires_grad_(False)


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB chunks so a 4 GB checkpoint never sits in memory.

    Remembered in the hash cache (`meebs.files.hash_cache`): an unchanged file is read once,
    not on every run; a changed size, mtime or inode hashes it again.
    """
    return cached_sha256(path)


def kohya_model_hash(path: Path) -> str:
    """kohya's `ss_sd_model_hash`: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with path.open("rb") as stream:
        stream.seek(_LEGACY_OFFSET)
        return hashlib.sha256(stream.read(_LEGACY_LENGTH)).hexdigest()[:8]


def noise_scheduler() -> DDPMScheduler:
    """The SD 1.5 training schedule: DDPM, 1000 steps, scaled_linear 0.00085..0.012, epsilon.

    Always this one, whatever scheduler a diffusers folder ships: that folder's scheduler
    is for sampling, and SD 1.x was trained with this schedule.
    """
    return DDPMScheduler.from_config(read_json(SCHEDULER_CONFIG))


def describe_base(model: BaseModel) -> str:
    """One line for the training plan: what the base is, where from, and its identity."""
    count = sum(
        parameter.numel()
        for part in (model.unet, model.text_encoder, model.vae)
        for parameter in part.parameters()
    )
    kohya = f", kohya hash {model.legacy_hash}" if model.legacy_hash else ""
    return (
        f"base model {model.name} from {model.source}: sha256 {model.sha256[:12]}…{kohya}, "
        f"{count / 1e6:.1f}M frozen fp32 parameters"
    )


def state_dict_sha256(parts: dict[str, nn.Module]) -> str:
    """sha256 over every tensor of the parts, in a fixed order that does not depend on dicts.

    For each part in the given order and each state-dict key sorted: the line
    `part.key dtype shape`, then the tensor's raw bytes.
    """
    digest = hashlib.sha256()
    for part_name, module in parts.items():
        state = module.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"{part_name}.{key} {tensor.dtype} {list(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def folder_sha256(folder: Path, files: list[Path]) -> str:
    """A diffusers folder's sha256: the sha256 of a `sha256sum`-style manifest.

    One line `<sha256 of file>  <path relative to folder>` per file that loading reads
    (each part's config.json and weights, every tokenizer file), sorted by relative path.
    Other files (fp16 variants, the sampling scheduler, a root checkpoint) do not count.
    """
    lines = sorted((file.relative_to(folder).as_posix(), sha256_file(file)) for file in files)
    manifest = "".join(f"{digest}  {relative}\n" for relative, digest in lines)
    return hashlib.sha256(manifest.encode()).hexdigest()


def parts_from_configs(
    config_dir: Path,
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The UNet, VAE and text encoder built from the configs in `config_dir`'s part folders."""
    unet = UNet2DConditionModel.from_config(read_json(config_dir / "unet" / "config.json"))
    vae = AutoencoderKL.from_config(read_json(config_dir / "vae" / "config.json"))
    text_config = CLIPTextConfig.from_dict(read_json(config_dir / "text_encoder" / "config.json"))
    return unet, vae, CLIPTextModel(text_config)


def check_pin(source: Path | str, actual: str, pin: str | None) -> None:
    if pin is not None and pin.strip().lower() != actual:
        raise ModelError(
            f"base model {source} has sha256 {actual}, the recipe pins {pin}: use the pinned "
            "file, or update model.sha256 if the new base model is intended"
        )


def refuse_pickle(path: Path) -> None:
    raise ModelError(
        f"refusing to load pickle file {path}: pickle can run code. Convert it to "
        ".safetensors, or set model.allow_pickle: true if you trust it"
    )


def not_sd1(path: Path, what: str) -> ModelError:
    return ModelError(f"{path} is {what}; meebs trains SD 1.x adapters only: {_FIX}")


def unreadable(path: Path, why: str) -> ModelError:
    return ModelError(f"{path} is not a Stable Diffusion checkpoint we can read ({why}): {_FIX}")


def first_line(err: BaseException) -> str:
    """Library errors can span many lines; a ModelError message is one."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot read {path} ({first_line(err)}): is the model folder complete?"
        ) from None
