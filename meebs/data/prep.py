"""`prep DIR --to NEWDIR`: a cleaned copy of a dataset, and the reason for every change.

Cleaning a dataset by hand is where a version's quality was won or lost, and afterwards
nobody could say which image went and why. prep makes the steps repeatable: it never
touches DIR, writes NEWDIR complete or not at all, and puts a record of every decision
next to the subset folders (see `meebs.data.prep_record`). The steps, in this order:

1. drop the images a person listed in a reviewed drop list (`meebs.data.drop_list`);
2. cull colour variants: of each drawing found in several colours (from the pixels, see
   `meebs.data.image_survey`), keep one, choosing the colour kept least so far, so the kept
   colours cycle evenly;
3. trim each folder to a multiple of the batch size, taking the last image of its most
   common colour, so no half batch remains and the colours stay even;
4. flatten transparency onto white, black, or the two alternating over the kept images;
5. rename the folder for new repeats and, with `class_token="none"`, drop the class token
   from the folder name and from the captions' first tag.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from meebs.data.drop_list import read_drop_list
from meebs.data.folders import IMAGE_EXTENSIONS, parse_subset_name
from meebs.data.image_survey import find_similar, survey_image
from meebs.data.images import BACKGROUNDS, background_for, flatten_to_rgb
from meebs.data.prep_options import Decision, PrepOptions
from meebs.data.prep_record import write_record
from meebs.errors import DataError
from meebs.files.atomic_write import make_folder, make_temp_folder, write_atomic, write_text_atomic
from meebs.files.png import png_bytes
from meebs.files.text_files import read_text

CAPTION_SUFFIX = ".txt"


def list_subsets(root: Path) -> list[tuple[Path, list[Path]]]:
    """Each subfolder of `root` with its image files, both sorted by name, hidden ones
    skipped (the order `meebs.data.folders` reads them in)."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    folders = [entry for entry in _visible(root) if entry.is_dir()]
    if not folders:
        raise DataError(
            f"{root} has no subfolders: give the folder that holds the "
            "'{repeats}_{tokens}' folders, e.g. data/img_1.0"
        )
    return [(folder, [path for path in _visible(folder) if _is_image(path)]) for folder in folders]


def _visible(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def prepare(
    source: Path, target: Path, options: PrepOptions, drop_file: Path | None = None
) -> list[Decision]:
    """Write the cleaned copy of `source` to the new folder `target`; return the decisions."""
    _check_target(source, target)
    subsets = list_subsets(source)
    new_names = [options.target_folder(folder.name) for folder, _ in subsets]  # checks names
    if len(set(new_names)) < len(new_names):
        raise DataError(f"two folders of {source} would both become one of {new_names}")
    decisions = [
        Decision(path.relative_to(source).as_posix()) for _, paths in subsets for path in paths
    ]
    if drop_file is not None:
        _apply_drop_list(decisions, read_drop_list(drop_file, [d.source for d in decisions]))
    for decision in _kept(decisions):
        decision.facts = survey_image(source / decision.source)
    if options.cull_colour_variants:
        _cull_colour_variants(decisions)
    for decision in _kept(decisions):
        folder, name = decision.source.split("/")
        decision.target = f"{options.target_folder(folder)}/{name}"
    if options.trim_to_batch:
        _trim(decisions, options.trim_to_batch)
    _write(source, target, decisions, options, drop_file)
    return decisions


def _check_target(source: Path, target: Path) -> None:
    if target.exists():
        raise DataError(
            f"{target} already exists: prep writes a new folder and never overwrites; "
            "choose another --to or remove it"
        )
    if target.resolve().is_relative_to(source.resolve()):
        raise DataError(f"--to {target} is inside {source}: prep never changes its source")


def _kept(decisions: Sequence[Decision]) -> list[Decision]:
    return [decision for decision in decisions if decision.kept]


def _apply_drop_list(decisions: Sequence[Decision], drops: dict[str, str]) -> None:
    for decision in decisions:
        if decision.source in drops:
            decision.step, decision.reason = "drop list", drops[decision.source]


def _cull_colour_variants(decisions: Sequence[Decision]) -> None:
    """Keep one image per colour-variant group, the colour kept least so far winning
    (then the colour's name, then the file name), walking groups and single images in
    file order, so the kept colours cycle evenly."""
    by_path = {decision.facts.path: decision for decision in _kept(decisions)}
    groups = find_similar([decision.facts for decision in by_path.values()]).colour_variants
    group_of = {path: group for group in groups for path in group}
    kept_colours: Counter[str] = Counter()
    for path in sorted(by_path):
        group = group_of.get(path, [path])
        if path != group[0]:
            continue  # a group is decided at its first image
        members = [by_path[member] for member in group]
        keeper = min(
            members, key=lambda d: (kept_colours[d.facts.colour], d.facts.colour, d.source)
        )
        kept_colours[keeper.facts.colour] += 1
        for other in members:
            if other is not keeper:
                other.step = "colour variant"
                other.reason = (
                    f"{other.facts.colour} variant of {keeper.source}, which is kept for "
                    f"this drawing in {keeper.facts.colour}"
                )


def _trim(decisions: Sequence[Decision], batch: int) -> None:
    """Drop the last image of the most common colour of each new folder until its count
    is a multiple of `batch`."""
    folders: dict[str, list[Decision]] = {}
    for decision in _kept(decisions):
        folders.setdefault(decision.target.split("/")[0], []).append(decision)
    for members in folders.values():
        while len(members) % batch:
            colours = Counter(member.facts.colour for member in members)
            colour, count = max(sorted(colours.items()), key=lambda item: item[1])
            last = [member for member in members if member.facts.colour == colour][-1]
            last.step, last.target = "trim", ""
            last.reason = (
                f"{len(members)} images is not a multiple of the batch size {batch}: dropped "
                f"the last {colour} image, the most common colour ({count} of {len(members)})"
            )
            members.remove(last)


def _write(
    source: Path,
    target: Path,
    decisions: Sequence[Decision],
    options: PrepOptions,
    drop_file: Path | None,
) -> None:
    """Build the new folder under a temporary name beside it, then rename it into place."""
    make_folder(target.parent)
    staging = make_temp_folder(target.parent, prefix=f".{target.name}.")
    try:
        flattened = 0
        for decision in _kept(decisions):
            background = None
            if options.flatten and decision.facts.transparent:
                background = background_for(flattened, options.flatten)
                flattened += 1
            _write_image(source, staging, decision, background)
            _write_caption(source, staging, decision, options)
        write_record(staging, source.name, decisions, options, drop_file)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_image(source: Path, staging: Path, decision: Decision, background: str | None) -> None:
    """Copy the file's bytes, or write it flattened onto `background` as PNG."""
    path = staging / decision.target
    make_folder(path.parent)
    if background is None:
        write_atomic(path, [(source / decision.source).read_bytes()])
        return
    with Image.open(source / decision.source) as image:
        flat = flatten_to_rgb(image, BACKGROUNDS[background])
    decision.target = Path(decision.target).with_suffix(".png").as_posix()
    if (staging / decision.target).exists():
        raise DataError(f"two images of {source} would both be written as {decision.target}")
    write_atomic(staging / decision.target, [png_bytes(flat)])
    decision.changes.append(f"transparency flattened onto {background}")


def _write_caption(source: Path, staging: Path, decision: Decision, options: PrepOptions) -> None:
    """Copy the caption, with the class token dropped from its first tag if asked."""
    caption_path = (source / decision.source).with_suffix(CAPTION_SUFFIX)
    new_path = (staging / decision.target).with_suffix(CAPTION_SUFFIX)
    _, tokens = parse_subset_name(Path(decision.source).parent)
    if not caption_path.is_file():
        decision.changes.append(
            f"no caption: trains on the folder's tokens '{options.tokens(tokens)}'"
        )
        return
    text = read_text(caption_path, "caption", DataError)
    line, newline, after = text.partition("\n")
    first, comma, rest = line.partition(",")
    if first.strip() != tokens or options.tokens(tokens) == tokens:
        write_atomic(new_path, [caption_path.read_bytes()])
        return
    new_line = options.tokens(tokens) + comma + rest
    write_text_atomic(new_path, new_line + newline + after)
    decision.changes.append(f"caption '{line.strip()}' -> '{new_line.strip()}'")
