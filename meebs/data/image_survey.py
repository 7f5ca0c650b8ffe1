"""What the pixels of a dataset say: transparency, duplicates, and colour variants of one
drawing, found without trusting file names.

A cleaned dataset keeps one image per pose, so prep needs to know which images are the
same drawing. Each image gets two fingerprints: a digest of its exact pixels, and a
*shape hash* (a difference hash of the brightness, flattened onto grey) that changes
little when only colours change. Images whose shape hashes are close are the same
drawing: *near duplicates* when their main colour is the same too, *colour variants* when
it differs.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from meebs.data.images import IMAGE_ERRORS, image_error_reason  # one definition of "a broken image"
from meebs.errors import DataError

HASH_SIDE = 32
"""The shape hash compares neighbours on a 32 x 32 grid, across and down: 2048 bits."""
HASH_MARGIN = 2
"""A cell counts as brighter only by more than this (of 255): flat areas stay stable
under noise such as JPEG's."""
SAME_SHAPE_DISTANCE = 0.3
"""Two images are one drawing when, of the hash bits set in either, fewer than this share
differ (flat areas set no bits, so a small figure on a big background still counts).
Measured on the drawn sets: at most 0.13 within a pose, at least 0.52 between poses."""
SAME_HUE_DEGREES = 20.0
"""Main colours closer than this count as the same colour."""
GREY = "grey"

_COLOUR_NAMES = (
    (15, "red"),
    (45, "orange"),
    (70, "yellow"),
    (165, "green"),
    (195, "teal"),
    (255, "blue"),
    (300, "purple"),
    (345, "pink"),
    (360, "red"),
)


@dataclass(frozen=True)
class ImageFacts:
    """One image as the survey sees it."""

    path: Path
    size: tuple[int, int]
    """(width, height) in pixels."""
    transparent: bool
    """Some pixel is not fully opaque (an alpha channel that is all opaque does not count)."""
    pixel_digest: str
    """sha256 of the size and the RGBA pixels: equal for identical pictures in any file."""
    shape_hash: np.ndarray
    """Booleans: is each grid cell brighter than its neighbour (see the module docstring)."""
    hue: float | None
    """The main colour's hue in degrees, from the saturated opaque pixels; None: grey."""

    @property
    def colour(self) -> str:
        """The main colour's name, e.g. `purple`."""
        return colour_name(self.hue)


@dataclass(frozen=True)
class Similarity:
    """Groups of images that are the same drawing, each group sorted, groups by first path."""

    exact: list[list[Path]]
    """Identical pixels."""
    near: list[list[Path]]
    """The same drawing in the same colours with small differences."""
    colour_variants: list[list[Path]]
    """The same drawing in different colours (exact duplicates count once)."""


def colour_name(hue: float | None) -> str:
    """A readable name for a hue in degrees; `grey` for None."""
    if hue is None:
        return GREY
    return next(name for limit, name in _COLOUR_NAMES if hue % 360 < limit)


def survey_image(path: Path) -> ImageFacts:
    """Decode `path` once and take its fingerprints; DataError (one line) if it is broken."""
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except IMAGE_ERRORS as error:
        raise DataError(f"cannot read image {path}: {image_error_reason(error)}") from error
    pixels = rgba.tobytes()
    digest = hashlib.sha256(f"{rgba.width}x{rgba.height}:".encode() + pixels).hexdigest()
    return ImageFacts(
        path=path,
        size=rgba.size,
        transparent=rgba.getchannel("A").getextrema()[0] < 255,
        pixel_digest=digest,
        shape_hash=_shape_hash(rgba),
        hue=_main_hue(rgba),
    )


def _shape_hash(rgba: Image.Image) -> np.ndarray:
    """Difference hash across and down of the brightness on mid grey, on a coarse grid."""
    grey = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
    grey.alpha_composite(rgba)
    side = HASH_SIDE + 1
    cells = np.asarray(grey.convert("L").resize((side, side), Image.Resampling.BOX), float)
    across = cells[:HASH_SIDE, 1:] > cells[:HASH_SIDE, :-1] + HASH_MARGIN
    down = cells[1:, :HASH_SIDE] > cells[:-1, :HASH_SIDE] + HASH_MARGIN
    return np.concatenate([across.ravel(), down.ravel()])


def _main_hue(rgba: Image.Image) -> float | None:
    """The peak of the hue histogram of opaque, saturated, not dark pixels, in degrees."""
    small = rgba.resize((128, 128), Image.Resampling.BOX)
    rgb = small.convert("RGB")
    hsv = np.asarray(rgb.convert("HSV"), dtype=int)
    alpha = np.asarray(small.getchannel("A"))
    coloured = (alpha >= 128) & (hsv[..., 1] >= 64) & (hsv[..., 2] >= 64)
    if coloured.sum() < coloured.size // 100:
        return None
    hue_bins = hsv[..., 0][coloured] // 8  # PIL's hue is 0..255: 32 bins
    in_peak = hue_bins == np.argmax(np.bincount(hue_bins))
    mean = np.asarray(rgb, dtype=float)[coloured][in_peak].mean(axis=0) / 255
    return colorsys.rgb_to_hsv(*mean)[0] * 360


def hue_distance(first: float | None, second: float | None) -> float:
    """Degrees between two hues around the colour wheel; grey is far from any colour."""
    if first is None or second is None:
        return 0.0 if first is second else 180.0
    gap = abs(first - second) % 360
    return min(gap, 360 - gap)


def find_similar(images: Sequence[ImageFacts]) -> Similarity:
    """Group identical images, then compare one image of each identical group with all
    others: close shape hashes make near duplicates or colour variants (see module)."""
    by_digest: dict[str, list[ImageFacts]] = {}
    for facts in sorted(images, key=lambda facts: facts.path):
        by_digest.setdefault(facts.pixel_digest, []).append(facts)
    exact = [[facts.path for facts in group] for group in by_digest.values() if len(group) > 1]
    unique = [group[0] for group in by_digest.values()]
    near, variants = _Groups(len(unique)), _Groups(len(unique))
    if unique:
        hashes = np.stack([facts.shape_hash for facts in unique]).astype(np.int32)
        shared = hashes @ hashes.T
        either = hashes.sum(axis=1)[:, None] + hashes.sum(axis=1)[None, :] - shared
        distances = 1 - shared / np.maximum(either, 1)
        close = np.triu(distances < SAME_SHAPE_DISTANCE, 1)
        for first, second in zip(*np.nonzero(close), strict=True):
            hues = unique[first].hue, unique[second].hue
            same_colour = hue_distance(*hues) < SAME_HUE_DEGREES
            (near if same_colour else variants).join(int(first), int(second))
    paths = [facts.path for facts in unique]
    return Similarity(exact, near.groups(paths), variants.groups(paths))


class _Groups:
    """Union-find over indices: which images are connected through similar pairs."""

    def __init__(self, count: int) -> None:
        self._parent = list(range(count))

    def _root(self, index: int) -> int:
        while self._parent[index] != index:
            index = self._parent[index]
        return index

    def join(self, first: int, second: int) -> None:
        self._parent[self._root(second)] = self._root(first)

    def groups(self, paths: Sequence[Path]) -> list[list[Path]]:
        """Groups of two or more, each sorted, in order of their first path."""
        members: dict[int, list[Path]] = {}
        for index, path in enumerate(paths):
            members.setdefault(self._root(index), []).append(path)
        return sorted(sorted(group) for group in members.values() if len(group) > 1)
