"""Training and regularization images in kohya's DreamBooth folder layout.

A dataset folder holds one subfolder per subject, named `{repeats}_{tokens}` (for example
`50_meeb person`). We follow kohya sd-scripts' meaning of that layout and its caption and
regularization rules (which images one epoch trains on, how many times each; batching is
meebs.data.batches), so step counts match kohya's, with three changes made on purpose for
reproducibility and clear errors:

- folders and files are read in sorted order (kohya uses filesystem order);
- a folder kohya would skip silently (bad name, no images) stops the run with a message;
- every image is decoded once while scanning, so a broken file fails before training.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from meebs.data.images import IMAGE_ERRORS, has_transparency, image_error_reason
from meebs.errors import DataError
from meebs.files.text_files import read_text, shown

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Image suffixes we read, compared case-insensitively (kohya's list without avif/jxl)."""

_SUBSET_NAME = re.compile(r"(?P<repeats>[0-9]+)_(?P<tokens>.*)", re.DOTALL)
_NAME_HINT = "rename it like '50_meeb person' (repeats, '_', then the caption tokens)"


@dataclass(frozen=True)
class ImageItem:
    """One image file and what training needs to know about it without decoding it again."""

    path: Path
    caption: str
    size: tuple[int, int]
    """(width, height) in pixels."""
    has_alpha: bool
    is_reg: bool
    subset: str
    """Name of the folder it came from, as kohya's metadata keys it."""


@dataclass(frozen=True)
class Subset:
    """One `{repeats}_{tokens}` folder and its images in sorted order."""

    folder: Path
    repeats: int
    tokens: str
    images: tuple[ImageItem, ...]
    is_reg: bool


@dataclass(frozen=True)
class DatasetScan:
    """Everything found in the training and regularization folders, plus user warnings."""

    train: tuple[Subset, ...]
    reg: tuple[Subset, ...]
    warnings: tuple[str, ...]
    held_out: tuple[ImageItem, ...] = ()
    """Validation images (meebs.data.validation_split): never trained on, not in `train`."""

    @property
    def num_train_images(self) -> int:
        """Distinct training image files."""
        return sum(len(subset.images) for subset in self.train)

    @property
    def num_reg_images(self) -> int:
        """Distinct regularization image files."""
        return sum(len(subset.images) for subset in self.reg)

    @property
    def train_samples_per_epoch(self) -> int:
        """Training images counted with their repeats: kohya's `ss_num_train_images`."""
        return sum(subset.repeats * len(subset.images) for subset in self.train)

    @property
    def reg_samples_with_repeats(self) -> int:
        """Regularization images counted with their folder repeats, before balancing:
        kohya's `ss_num_reg_images`."""
        return sum(subset.repeats * len(subset.images) for subset in self.reg)

    @property
    def unique_images(self) -> tuple[ImageItem, ...]:
        """Training images then regularization images, in scan order. An image's position
        here never changes between epochs, so it is the index for `background_for`."""
        return tuple(image for subset in self.train + self.reg for image in subset.images)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: repeats and image count per training folder."""
        return _dirs_info(self.train)

    def reg_dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_reg_dataset_dirs`: repeats and image count per reg folder."""
        return _dirs_info(self.reg)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per folder (training and reg, like kohya), how many
        images carry each comma-separated tag, lower-cased; repeats are not counted."""
        frequency: dict[str, dict[str, int]] = {}
        for subset in self.train + self.reg:
            counts = frequency.setdefault(subset.folder.name, {})
            for image in subset.images:
                for tag in split_tags(image.caption):
                    counts[tag.lower()] = counts.get(tag.lower(), 0) + 1
        return frequency


def _dirs_info(subsets: tuple[Subset, ...]) -> dict[str, dict[str, int]]:
    return {s.folder.name: {"n_repeats": s.repeats, "img_count": len(s.images)} for s in subsets}


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


# --- scanning -------------------------------------------------------------------------------


def parse_subset_name(folder: Path) -> tuple[int, str]:
    """Read (repeats, tokens) from a kohya folder name such as `50_meeb person`.

    kohya ignores a folder whose name does not parse; we refuse it, because a silently
    skipped folder trains a different adapter than the user meant.
    """
    match = _SUBSET_NAME.fullmatch(folder.name)
    named = _path_text(folder)
    if match is None:
        raise DataError(f"folder {named} does not start with '{{repeats}}_': {_NAME_HINT}")
    repeats, tokens = int(match["repeats"]), match["tokens"].strip()
    if repeats < 1:
        raise DataError(f"folder {named} has {repeats} repeats, it needs at least 1: {_NAME_HINT}")
    if not tokens:
        raise DataError(f"folder {named} has no tokens after '_': {_NAME_HINT}")
    return repeats, tokens


def scan_dataset(
    train_dir: Path,
    reg_dir: Path | None,
    caption_extension: str,
    resolution: tuple[int, int],
) -> DatasetScan:
    """Read and check every training and regularization image before training starts.

    Raises DataError for anything that would make kohya skip data silently or crash late:
    missing folders, badly named or empty subfolders, unreadable images or captions.
    Images without captions and images smaller than `resolution` only produce warnings.
    """
    suffix = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
    warnings: list[str] = []
    train = _scan_root(train_dir, "data.train_dir", False, suffix, resolution, warnings)
    reg = ()
    if reg_dir is not None:
        reg = _scan_root(reg_dir, "data.reg_dir", True, suffix, resolution, warnings)
    scan = DatasetScan(train=train, reg=reg, warnings=())
    warnings.extend(_unused_reg_warning(scan))
    return replace(scan, warnings=tuple(warnings))


def _scan_root(
    root: Path,
    setting: str,
    is_reg: bool,
    caption_suffix: str,
    resolution: tuple[int, int],
    warnings: list[str],
) -> tuple[Subset, ...]:
    if not root.exists():
        raise DataError(
            f"{setting} folder {_path_text(root)} does not exist: create it or fix {setting}"
        )
    if not root.is_dir():
        raise DataError(f"{setting} {_path_text(root)} is a file, not a folder: fix {setting}")
    entries = list(_sorted_entries(root))
    folders = [entry for entry in entries if entry.is_dir()]
    if not folders:
        raise DataError(
            f"{setting} folder {_path_text(root)} has no subfolders: put the images in a "
            f"subfolder named '{{repeats}}_{{subject}} {{class}}' such as '50_meeb person' "
            "(images directly in it are not used)"
        )
    loose = [entry for entry in entries if _is_image_file(entry)]
    if loose:
        warnings.append(
            f"{len(loose)} image(s) directly in {root} are not used: only its "
            f"'{{repeats}}_{{tokens}}' subfolders are read"
        )
    return tuple(
        _scan_subset(folder, is_reg, caption_suffix, resolution, warnings) for folder in folders
    )


def _sorted_entries(folder: Path) -> Iterator[Path]:
    """Non-hidden entries by name: kohya's filesystem order differs between machines, and
    hidden files (macOS `._x.png` resource forks) are not images even with an image suffix."""
    names = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
    return (folder / name for name in names)


def _path_text(path: Path) -> str:
    """A folder or file name in a one-line message: a name may hold a newline."""
    return shown(str(path), limit=300)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _scan_subset(
    folder: Path,
    is_reg: bool,
    caption_suffix: str,
    resolution: tuple[int, int],
    warnings: list[str],
) -> Subset:
    repeats, tokens = parse_subset_name(folder)
    paths = [entry for entry in _sorted_entries(folder) if _is_image_file(entry)]
    if not paths:
        raise DataError(
            f"folder {_path_text(folder)} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
            "add images or remove the folder"
        )
    images = []
    uncaptioned = 0
    for path in paths:
        caption = _read_caption(path.with_suffix(caption_suffix))
        uncaptioned += not caption
        size, has_alpha = _inspect_image(path)
        if size[0] < resolution[0] or size[1] < resolution[1]:
            warnings.append(
                f"{path} is {size[0]}x{size[1]}, smaller than the training resolution "
                f"{resolution[0]}x{resolution[1]}: it will be upscaled and may look soft"
            )
        item = ImageItem(path, caption or tokens, size, has_alpha, is_reg, folder.name)
        images.append(item)
    if uncaptioned:
        warnings.append(
            f"{uncaptioned} image(s) in {folder} have no {caption_suffix} caption: "
            f"using the folder's tokens '{tokens}'"
        )
    return Subset(folder, repeats, tokens, tuple(images), is_reg)


def _read_caption(path: Path) -> str:
    """The caption's first line, stripped; "" when there is no caption file or it is blank."""
    if not path.is_file():
        return ""
    lines = read_text(path, "caption", DataError).strip().splitlines()
    return lines[0].strip() if lines else ""


def _inspect_image(path: Path) -> tuple[tuple[int, int], bool]:
    """Size and transparency from the header, then a full decode so that a truncated or
    corrupt file fails now, naming the file, instead of hours into training."""
    try:
        with Image.open(path) as image:
            size, has_alpha = image.size, has_transparency(image)
            image.load()
    except IMAGE_ERRORS as error:
        raise DataError(
            f"cannot read image {_path_text(path)}: {image_error_reason(error)}; "
            "remove or replace it"
        ) from error
    return size, has_alpha


# --- one epoch's samples: repeats and reg balance -------------------------------------------


def balanced_reg_samples(scan: DatasetScan) -> list[ImageItem]:
    """Regularization samples for one epoch, balanced against the training samples like
    sd-scripts' DreamBoothDataset.

    Reg images are taken in scan order, each with its folder's repeats, until their count
    reaches `train_samples_per_epoch`; images after that point go unused. If all of them
    together fall short, they get one extra repeat each, round-robin, until the count is
    reached. As in sd-scripts, the image that crosses the target keeps all its repeats, so
    with reg repeats above 1 the count can exceed the target by up to repeats - 1.
    """
    counts = _reg_counts(scan)
    return [image for image, count in counts for _ in range(count)]


def _reg_counts(scan: DatasetScan) -> list[tuple[ImageItem, int]]:
    """How often each used reg image appears in an epoch, in scan order."""
    target = scan.train_samples_per_epoch
    entries = [(image, subset.repeats) for subset in scan.reg for image in subset.images]
    used = total = 0
    while used < len(entries) and total < target:
        total += entries[used][1]
        used += 1
    if used == 0:
        return []
    # The round-robin extra repeats: everyone gets `extra // used`, the first ones one more.
    extra = max(0, target - total)
    return [
        (image, repeats + extra // used + (index < extra % used))
        for index, (image, repeats) in enumerate(entries[:used])
    ]


def _unused_reg_warning(scan: DatasetScan) -> list[str]:
    unused = scan.num_reg_images - len(_reg_counts(scan))
    if not unused:
        return []
    return [
        f"{unused} of {scan.num_reg_images} reg images are not used: an epoch has "
        f"{scan.train_samples_per_epoch} training samples and kohya balances reg to match"
    ]


def epoch_samples(scan: DatasetScan) -> list[ImageItem]:
    """One epoch: every training image `repeats` times, then its balanced reg partners."""
    train = [
        image for subset in scan.train for image in subset.images for _ in range(subset.repeats)
    ]
    return train + balanced_reg_samples(scan)
