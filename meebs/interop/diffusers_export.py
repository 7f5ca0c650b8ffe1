"""Write a base model as a diffusers folder that ComfyUI and `load_base_model` read back.

The text encoder is written with the published SD 1.5 key layout (`text_model.…`):
transformers 5 would save it without that level, and ComfyUI then loads the folder with
only a "clip missing" warning and a random text encoder (REFERENCE §6). The folder is
built under a hidden temp name next to the target and renamed into place, so it is
either complete or absent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from meebs.errors import MeebsError
from meebs.files.atomic_write import make_temp_folder
from meebs.models.base import BaseModel, folder_sha256

TEXT_MODEL_PREFIX = "text_model."


def save_diffusers_folder(model: BaseModel, folder: Path) -> str:
    """Write `model` to the new folder `folder` and return its sha256 (`folder_sha256`)."""
    folder = Path(folder)
    if folder.exists():
        raise MeebsError(f"{folder} already exists; refusing to overwrite it")
    temp = make_temp_folder(folder.parent, prefix=f".{folder.name}.", suffix=".tmp")
    try:
        files = _write_parts(model, temp)
        os.rename(temp, folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(temp)
        if isinstance(exc, OSError):
            raise MeebsError(
                f"cannot write {folder}: {exc.strerror or exc}; nothing was written"
            ) from None
        raise
    return folder_sha256(folder, [folder / file.relative_to(temp) for file in files])


def _write_parts(model: BaseModel, root: Path) -> list[Path]:
    """Every file that `load_base_model` reads, hence every file the sha256 covers."""
    model.unet.save_pretrained(root / "unet", safe_serialization=True)
    model.vae.save_pretrained(root / "vae", safe_serialization=True)
    text_dir = root / "text_encoder"
    model.text_encoder.config.save_pretrained(text_dir)
    state = {
        TEXT_MODEL_PREFIX + key: value.contiguous()
        for key, value in model.text_encoder.state_dict().items()
    }
    save_file(state, text_dir / "model.safetensors", metadata={"format": "pt"})
    model.tokenizer.save_pretrained(root / "tokenizer")
    files = [root / part / name for part, name in _PART_FILES]
    return files + [file for file in (root / "tokenizer").iterdir() if file.is_file()]


_PART_FILES = (
    ("unet", "config.json"),
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "config.json"),
    ("vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "config.json"),
    ("text_encoder", "model.safetensors"),
)
