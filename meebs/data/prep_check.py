"""`prep check DIR`: what is wrong with a dataset, found before training, changing nothing.

Each problem is a finding, not an error: a person decides what to do about it (often
with `prep DIR --to NEWDIR`). The check looks at what training would see: per subset
folder the image count, transparency, images below the training resolution, missing or
empty captions, corrupt files and the remainder of count / batch size; across the whole
dataset exact duplicates, near duplicates and colour variants of one drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meebs.data.folders import parse_subset_name
from meebs.data.image_survey import ImageFacts, find_similar, survey_image
from meebs.data.prep import CAPTION_SUFFIX, list_subsets
from meebs.errors import DataError

DEFAULT_RESOLUTION = 512
"""The training resolution of the real recipes."""
DEFAULT_BATCH_SIZE = 2

FOLDER_NAME = "folder name"
TRANSPARENT = "transparent"
SMALL = "below resolution"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
CORRUPT = "corrupt"
EXACT_DUPLICATES = "exact duplicates"
NEAR_DUPLICATES = "near duplicates"
COLOUR_VARIANTS = "colour variants"
REMAINDER = "half batch"


@dataclass(frozen=True)
class Finding:
    """One problem: its kind (the constants above), the files it concerns, and advice."""

    kind: str
    paths: tuple[Path, ...]
    message: str


@dataclass(frozen=True)
class FolderCounts:
    """One row of the report's table."""

    name: str
    images: int
    transparent: int
    small: int
    missing_captions: int
    empty_captions: int
    corrupt: int
    remainder: int


@dataclass(frozen=True)
class CheckReport:
    root: Path
    folders: tuple[FolderCounts, ...]
    findings: tuple[Finding, ...]

    def of_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]


def check_dataset(
    root: Path, resolution: int = DEFAULT_RESOLUTION, batch_size: int = DEFAULT_BATCH_SIZE
) -> CheckReport:
    """Survey every image under `root`'s subset folders and list what needs attention."""
    if resolution < 1 or batch_size < 1:
        raise DataError("--resolution and --batch-size must be at least 1")
    folders, findings, surveyed = [], [], []
    for folder, paths in list_subsets(root):
        counts, folder_findings, facts = _check_folder(root, folder, paths, resolution, batch_size)
        folders.append(counts)
        findings += folder_findings
        surveyed += facts
    findings += _similarity_findings(root, surveyed)
    return CheckReport(root, tuple(folders), tuple(findings))


def _check_folder(
    root: Path, folder: Path, paths: list[Path], resolution: int, batch_size: int
) -> tuple[FolderCounts, list[Finding], list[ImageFacts]]:
    findings = []
    try:
        parse_subset_name(folder)
    except DataError as error:
        findings.append(Finding(FOLDER_NAME, (folder,), f"{error}; kohya skips it silently"))
    facts: list[ImageFacts] = []
    for path in paths:
        try:
            facts.append(survey_image(path))
        except DataError as error:
            findings.append(Finding(CORRUPT, (path,), f"{error}: remove or replace it"))
    transparent = [f.path for f in facts if f.transparent]
    small = [f.path for f in facts if min(f.size) < resolution]
    captions = {path: path.with_suffix(CAPTION_SUFFIX) for path in paths}
    missing = [path for path, caption in captions.items() if not caption.is_file()]
    empty = [p for p, c in captions.items() if c.is_file() and not c.read_bytes().strip()]
    name = folder.relative_to(root).as_posix()
    for kind, members, advice in (
        (TRANSPARENT, transparent, "training flattens them; prep --flatten makes it explicit"),
        (SMALL, small, f"smaller than {resolution} px: they are upscaled and look soft"),
        (MISSING_CAPTION, missing, f"no {CAPTION_SUFFIX} file: they train on the folder name"),
        (EMPTY_CAPTION, empty, f"an empty {CAPTION_SUFFIX} file: they train on the folder name"),
    ):
        if members:
            message = f"{len(members)} of {len(paths)} images in {name}: {advice}"
            findings.append(Finding(kind, tuple(members), message))
    remainder = len(paths) % batch_size
    if remainder:
        message = (
            f"{name} has {len(paths)} images, {remainder} more than a multiple of the batch "
            f"size {batch_size}: prep --trim-to-batch {batch_size} drops {remainder}"
        )
        findings.append(Finding(REMAINDER, (folder,), message))
    counts = FolderCounts(
        name,
        len(paths),
        len(transparent),
        len(small),
        len(missing),
        len(empty),
        len(paths) - len(facts),
        remainder,
    )
    return counts, findings, facts


def _similarity_findings(root: Path, facts: Sequence[ImageFacts]) -> list[Finding]:
    similarity = find_similar(facts)
    colour_of = {f.path: f.colour for f in facts}
    findings = []
    for kind, groups, advice in (
        (EXACT_DUPLICATES, similarity.exact, "identical pixels: keep one"),
        (NEAR_DUPLICATES, similarity.near, "the same picture with small changes: keep one"),
        (COLOUR_VARIANTS, similarity.colour_variants, "one drawing in several colours"),
    ):
        for group in groups:
            names = ", ".join(f"{p.relative_to(root).as_posix()} ({colour_of[p]})" for p in group)
            findings.append(Finding(kind, tuple(group), f"{advice}: {names}"))
    return findings


def print_check(report: CheckReport, resolution: int, batch_size: int, console: Console) -> None:
    """The table of counts per folder, then every finding on its own line."""
    table = Table(
        "folder",
        "images",
        "transparent",
        f"< {resolution} px",
        "no caption",
        "empty caption",
        "corrupt",
        f"count % {batch_size}",
        title=f"prep check {report.root}",
    )
    for row in report.folders:
        table.add_row(*(str(value) for value in astuple(row)))
    console.print(table)
    if not report.findings:
        console.print("no problems found")
    for finding in report.findings:
        console.print(
            f"{finding.kind}: {finding.message}", markup=False, highlight=False, soft_wrap=True
        )
    variants = report.of_kind(COLOUR_VARIANTS)
    if variants:
        images = sum(len(finding.paths) for finding in variants)
        console.print(
            f"{len(variants)} drawings come in several colours ({images} images): "
            "prep --cull-colour-variants keeps one of each, cycling the colours",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
