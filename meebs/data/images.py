"""Image files at train time: what counts as a broken image, transparency flattened onto a
background, and the pixels a bucket trains on (scaled and cropped as kohya does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from meebs.errors import DataError

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
"""Solid colours a transparent image is flattened onto."""

# PIL reports broken files with any of these, depending on the format and the damage.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def image_error_reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow recognises (corrupt or mislabelled file)"
    return " ".join(str(error).split()) or type(error).__name__


def background_for(index: int, mode: str) -> str:
    """The colour transparency is flattened onto for the image at `index` in
    `DatasetScan.unique_images`: fixed, or white and black alternating by image."""
    if mode in BACKGROUNDS:
        return mode
    if mode == "alternate":
        return "white" if index % 2 == 0 else "black"
    raise ValueError(f"background mode must be white, black or alternate, got {mode!r}")


def load_image(path: Path, size: tuple[int, int], background: str) -> torch.Tensor:
    """The image as a float tensor [3, H, W] in [-1, 1] for a bucket of `size` (w, h).

    Transparency is flattened onto `background`, any mode is converted to RGB, and the
    image is scaled (Lanczos) to cover the bucket and center-cropped, as kohya does.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be white or black, got {background!r}")
    try:
        with Image.open(path) as image:
            rgb = flatten_to_rgb(image, BACKGROUNDS[background])
    except IMAGE_ERRORS as error:
        raise DataError(
            f"cannot read image {path}: {image_error_reason(error)}; remove or replace it"
        ) from error
    pixels = np.array(_cover_and_crop(rgb, size), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def flatten_to_rgb(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    if not has_transparency(image):
        return image.convert("RGB")
    flat = Image.new("RGBA", image.size, (*colour, 255))
    flat.alpha_composite(image.convert("RGBA"))
    return flat.convert("RGB")


def _cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers `size` with kohya's rounding, then cut out the center."""
    (width, height), (target_w, target_h) = image.size, size
    if (width, height) == (target_w, target_h):
        return image
    wider = width / height > target_w / target_h
    scale = target_h / height if wider else target_w / width
    resized_w = max(target_w, int(width * scale + 0.5))
    resized_h = max(target_h, int(height * scale + 0.5))
    resized = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    left, top = (resized_w - target_w) // 2, (resized_h - target_h) // 2
    return resized.crop((left, top, left + target_w, top + target_h))
