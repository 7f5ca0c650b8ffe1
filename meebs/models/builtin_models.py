"""The built-in base models a recipe names with `model.builtin`.

- `tiny`: the tiny SD 1.5-shaped model for demos and tests, seeded random weights;
- `tiny-trained`: the tiny model pretrained by `make pretrain-tiny`, committed in
  `meebs/assets/tiny-trained/` and pinned like any base;
- `sd15-random`: the real SD 1.5 architecture with seeded random weights, for benchmarks.

The random ones are built from the configs shipped in `meebs/configs/`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from meebs.errors import ModelError
from meebs.models.base import (
    SD15_CONFIGS,
    TINY_CONFIGS,
    BaseModel,
    noise_scheduler,
    parts_from_configs,
    read_json,
    state_dict_sha256,
)
from meebs.models.diffusers_folder import load_folder
from meebs.models.tokenizer import clip_tokenizer

BUILTINS = ("tiny", "tiny-trained", "sd15-random")
TINY_TRAINED = Path(__file__).parent.parent / "assets" / "tiny-trained"
TINY_TRAINED_SHA256 = "c09d0c38452f6180f46fab7cab569382c3a8c9f750275caad76fce3251e3d140"
"""The folder sha256 of the committed `tiny-trained` weights (see its MODEL_CARD.md)."""


def build_tiny(seed: int = 0) -> BaseModel:
    """The tiny SD 1.5-shaped model (REFERENCE section 11) for demos and tests; ~0.1 s.

    Its sha256 hashes the weights themselves, so it is pinned and recorded like any file.
    """
    unet, vae, text_encoder = _seeded_parts(TINY_CONFIGS, seed)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    return _builtin("tiny", parts, state_dict_sha256(parts))


def load_tiny_trained() -> BaseModel:
    """The tiny base trained to draw people, shapes and made-up creatures by
    `make pretrain-tiny`; committed as fp16 safetensors and pinned like any base."""
    model = load_folder(TINY_TRAINED, TINY_TRAINED_SHA256, allow_pickle=False)
    model.name, model.source = "tiny-trained", "builtin:tiny-trained"
    return model


def build_sd15_random(seed: int = 0) -> BaseModel:
    """The real SD 1.5 architecture with seeded random weights, for tests and benchmarks.

    Weights get the libraries' default initialisation, done once (9-15 s on 2 cores, mostly
    the UNet's 860M parameters). Hashing ~1B weights would add seconds, so its sha256
    hashes what determines them instead: the shipped configs, the seed and the versions of
    torch, diffusers and transformers (see `_recipe_sha256`).
    """
    unet, vae, text_encoder = _seeded_parts(SD15_CONFIGS, seed)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    return _builtin("sd15-random", parts, _recipe_sha256("sd15-random", seed, SD15_CONFIGS))


def load_builtin(name: str) -> BaseModel:
    if name == "tiny":
        return build_tiny()
    if name == "tiny-trained":
        return load_tiny_trained()
    if name == "sd15-random":
        return build_sd15_random()
    raise ModelError(f"unknown model.builtin {name!r}: use one of {', '.join(BUILTINS)}")


def _builtin(name: str, parts: dict[str, torch.nn.Module], sha256: str) -> BaseModel:
    return BaseModel(
        **parts,
        tokenizer=clip_tokenizer(),
        noise_scheduler=noise_scheduler(),
        sha256=sha256,
        name=name,
        legacy_hash=None,
        source=f"builtin:{name}",
    )


def _seeded_parts(
    config_dir: Path, seed: int
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build the parts with default initialisation from `seed`, leaving the caller's RNG alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return parts_from_configs(config_dir)


def _recipe_sha256(name: str, seed: int, config_dir: Path) -> str:
    """sha256 of canonical JSON naming everything that fixes a built-in's random weights.

    That is: the built-in's name, the seed, every shipped config file (parsed, keys
    sorted) and the torch, diffusers and transformers versions, whose initialisers draw
    the weights.
    """
    identity = {
        "builtin": name,
        "seed": seed,
        "configs": {
            file.relative_to(config_dir).as_posix(): read_json(file)
            for file in sorted(config_dir.rglob("*.json"))
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
