"""Base models as a diffusers folder: `unet/`, `vae/`, `text_encoder/`, optional `tokenizer/`.

The configs tell SD 1.x from SD 2.x and SDXL before any weights are read; the folder's
sha256 covers exactly the files loading reads (`meebs.models.base.folder_sha256`), and
loading is offline and strict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers.utils.logging
import transformers.utils.logging
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from meebs.errors import ModelError
from meebs.models.base import (
    BaseModel,
    check_pin,
    first_line,
    folder_sha256,
    noise_scheduler,
    not_sd1,
    read_json,
    refuse_pickle,
    unreadable,
)
from meebs.models.tokenizer import MAX_LENGTH, clip_tokenizer

# Weight file names in a diffusers folder, safetensors first, pickle fallback second.
FOLDER_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


def load_folder(folder: Path, pin: str | None, allow_pickle: bool) -> BaseModel:
    check_folder_architecture(folder)
    weights = {
        part: _weight_files(folder / part, names, allow_pickle)
        for part, names in FOLDER_WEIGHTS.items()
    }
    digest = folder_sha256(folder, _folder_files(folder, weights))
    check_pin(folder, digest, pin)
    unet = _from_pretrained(UNet2DConditionModel, folder, "unet", weights["unet"])
    vae = _from_pretrained(AutoencoderKL, folder, "vae", weights["vae"])
    text_encoder = _from_pretrained(CLIPTextModel, folder, "text_encoder", weights["text_encoder"])
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_folder_tokenizer(folder),
        noise_scheduler=noise_scheduler(),
        sha256=digest,
        name=folder.name,
        legacy_hash=None,
        source=str(folder),
    )


def check_folder_architecture(folder: Path) -> None:
    """Tell SD 1.x from SD 2.x / SDXL by the configs alone, before any weights.

    SD 1.x-shaped means: a 4-channel UNet2DConditionModel whose cross-attention width is
    the hidden size of a CLIP text encoder, and not SD 2.x's 1024 or SDXL's 2048. Real SD
    1.5 has 768; the tiny built-in saved as a folder (32) passes too.
    """
    if (folder / "text_encoder_2").is_dir():
        raise not_sd1(folder, "an SDXL model folder (it has text_encoder_2/)")
    unet = _folder_config(folder, "unet")
    context = unet.get("cross_attention_dim")
    if context == 2048:
        raise not_sd1(folder, "an SDXL model folder (2048-wide cross-attention)")
    if context == 1024:
        raise not_sd1(folder, "an SD 2.x model folder (1024-wide cross-attention)")
    text = _folder_config(folder, "text_encoder")
    if (
        unet.get("_class_name") != "UNet2DConditionModel"
        or text.get("model_type") != "clip_text_model"
        or context != text.get("hidden_size")
    ):
        raise unreadable(folder, "its unet/ and text_encoder/ configs are not SD 1.x")
    if unet.get("in_channels", 4) != 4:
        raise not_sd1(
            folder, f"an SD 1.x inpainting or edit model ({unet['in_channels']} channels)"
        )


def _folder_config(folder: Path, part: str) -> dict[str, Any]:
    config_file = folder / part / "config.json"
    if not config_file.is_file():
        raise unreadable(folder, f"no {part}/config.json")
    return read_json(config_file)


def _weight_files(part_dir: Path, names: tuple[str, str], allow_pickle: bool) -> list[Path]:
    """The weight files `from_pretrained` will read for one part: safetensors, else pickle.

    A sharded checkpoint is its index plus the shards it lists.
    """
    for name in names:
        for candidate in (part_dir / name, part_dir / f"{name}.index.json"):
            if not candidate.is_file():
                continue
            if name.endswith(".bin") and not allow_pickle:
                refuse_pickle(candidate)
            if candidate.name.endswith(".index.json"):
                shards = sorted(set(read_json(candidate).get("weight_map", {}).values()))
                return [candidate, *(part_dir / shard for shard in shards)]
            return [candidate]
    raise ModelError(f"{part_dir} has no {names[0]}: is the diffusers folder complete?")


def _folder_files(folder: Path, weights: dict[str, list[Path]]) -> list[Path]:
    """Every file loading reads: each part's config.json and weights, all tokenizer files."""
    files = [folder / part / "config.json" for part in weights]
    files += [file for part_files in weights.values() for file in part_files]
    tokenizer_dir = folder / "tokenizer"
    if tokenizer_dir.is_dir():
        files += [file for file in tokenizer_dir.iterdir() if file.is_file()]
    return files


def _from_pretrained(cls: Any, folder: Path, part: str, weights: list[Path]) -> Any:
    """`from_pretrained` offline on the files already hashed, then a strict key check."""
    try:
        with _without_progress_bars():
            module, info = cls.from_pretrained(
                folder / part,
                local_files_only=True,
                use_safetensors=".safetensors" in weights[0].name,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as err:
        reason = first_line(err)
        raise ModelError(
            f"cannot load {folder / part} ({reason}): is the folder complete?"
        ) from None
    bad = sorted(
        f"{kind.removesuffix('_keys')} {key}"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        for key in info.get(kind) or ()
    )
    if bad:
        raise ModelError(
            f"{folder / part} does not match its config ({len(bad)} bad keys, e.g. {bad[0]}): "
            "re-download it"
        )
    return module


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Silence the libraries' own tqdm bars ("Loading weights: 0%|...") while a part loads:
    they draw into our rich output and cut its lines. The setting is global to each
    library, so whatever it was is restored afterwards."""
    libraries = (transformers.utils.logging, diffusers.utils.logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, enabled, strict=True):
            if was_enabled:
                library.enable_progress_bar()


def _folder_tokenizer(folder: Path) -> CLIPTokenizer:
    """The folder's own tokenizer when it has one (it may carry added tokens), else ours."""
    tokenizer_dir = folder / "tokenizer"
    if not tokenizer_dir.is_dir():
        return clip_tokenizer()
    try:
        return CLIPTokenizer.from_pretrained(
            tokenizer_dir, local_files_only=True, model_max_length=MAX_LENGTH
        )
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise ModelError(f"cannot load {tokenizer_dir} ({reason}): delete it to use ours") from None
