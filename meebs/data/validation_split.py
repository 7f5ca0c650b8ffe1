"""Which images validation scores: some held out of the training folders, or a folder.

With `validation.fraction` each training folder gives up round(fraction x images) of its
images (at least one where it has more than one; a one-image folder gives none), chosen
with the split's own seed, so the split is stable under that seed and changes with it,
and never with the training seed. The held-out images are removed from the scan, so the
plan, the step count and every epoch see only what is trained on. With
`validation.folder` the training folders stay whole and the folder (kohya layout) is
scored instead; an image in both is refused, by content.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from meebs.data.folders import DatasetScan, ImageItem, Subset, scan_dataset
from meebs.errors import DataError, RecipeError
from meebs.files.hash_cache import cached_sha256
from meebs.recipe.schema import Recipe


def split_scan(recipe: Recipe, scan: DatasetScan) -> DatasetScan:
    """`scan` without its held-out images, which go to `held_out` (unchanged if off)."""
    val = recipe.validation
    if not val.enabled:
        return scan
    warnings = list(scan.warnings)
    if not scan.reg:
        warnings.append(
            "validation without reg images (data.reg_dir): class drift is not measured, "
            "the recommended epoch rests on the subject loss alone"
        )
    if val.folder is not None:
        held_out = _folder_images(recipe, Path(val.folder), scan)
        return replace(scan, held_out=held_out, warnings=tuple(warnings))
    train, held_out = [], []
    for subset in scan.train:
        kept, out = hold_out(subset, val.fraction, val.seed)
        train.append(replace(subset, images=kept))
        held_out.extend(out)
    if not held_out:
        raise RecipeError(
            "validation.fraction: every training folder has a single image, so none can be "
            "held out; add images or set validation.folder"
        )
    return replace(scan, train=tuple(train), held_out=tuple(held_out), warnings=tuple(warnings))


def hold_out(
    subset: Subset, fraction: float, seed: int
) -> tuple[tuple[ImageItem, ...], tuple[ImageItem, ...]]:
    """(kept, held out) of one folder, both in scan order."""
    images = subset.images
    if len(images) < 2:
        return images, ()
    count = max(1, round(fraction * len(images)))
    if count >= len(images):
        raise RecipeError(
            f"validation.fraction: {fraction} holds out {count} of the {len(images)} images "
            f"in {subset.folder}, leaving none to train on; lower it"
        )
    # string seeds are hashed with sha512: the same on every machine and Python run
    chosen = set(random.Random(f"{seed}/{subset.folder.name}").sample(range(len(images)), count))
    kept = tuple(im for i, im in enumerate(images) if i not in chosen)
    return kept, tuple(im for i, im in enumerate(images) if i in chosen)


def _folder_images(recipe: Recipe, folder: Path, scan: DatasetScan) -> tuple[ImageItem, ...]:
    data = recipe.data
    found = scan_dataset(
        folder, None, data.caption_extension, (data.resolution[0], data.resolution[1])
    )
    images = tuple(im for subset in found.train for im in subset.images)
    training = {cached_sha256(im.path): im.path for s in scan.train for im in s.images}
    for image in images:
        same = training.get(cached_sha256(image.path))
        if same is not None:
            raise DataError(
                f"validation.folder: {image.path} is the same file as training image {same}; "
                "a validation image must not be trained on: remove one of them"
            )
    return images
