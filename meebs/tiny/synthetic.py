"""The committed data sets, drawn: the project's version history in miniature.

The demo and the tests must run anywhere without downloading a data set, and the history
of the original project must be reproducible, so every image here is drawn from one seeded
`random.Random` (see `meebs.tiny.cartoons`) and saved with fixed PNG settings: regenerating gives
the same bytes. `python -m meebs.tiny.synthetic data` (`make data`) writes, under `data/`:

- `img_1.0/2_meeb person/`: version 1.0's raw set: 37 poses of the mascot, each in 4 body
  colours, plus 4 off-model one-eyed "cyclops" drawings, all on transparent backgrounds.
  File names are numbered in a shuffled order, so nothing but the pixels tells which
  images are colour variants of one pose or which ones are cyclopes.
- `img_1.0.review.yaml`: the review a person made of 1.0: the cyclopes, each with a reason.
  It is written here only because the data is drawn; for real data a person writes it.
- `reg/1_person/`: plain people to regularize the class "person" with.
- `img_1.1/`: version 1.1, made from 1.0 by `meebs.data.prep` exactly as `PREP_1_1` says.
- `demo/`: what the CPU demo trains on: the first images of 1.1 and of `reg`, and the
  next image of 1.1 held out for validation (`demo/val/`).

Images are 512 px, the training resolution of the real recipes; the whole of `data/`
stays a few MB because the drawings are flat colours that PNG compresses well.
"""

from __future__ import annotations

import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from meebs.data.prep import prepare
from meebs.data.prep_options import PrepOptions
from meebs.files.atomic_write import make_folder, make_temp_folder, write_text_atomic
from meebs.files.png import write_png
from meebs.tiny.cartoons import (
    MEEB_ACTIONS,
    MEEB_PROPS,
    MOUTHS,
    PERSON_ACTIONS,
    SKINS,
    Color,
    MeebPose,
    PersonPose,
    draw_meeb,
    draw_person,
)

SEED = 1505
SIZE = 512
POSE_COUNT = 37
CYCLOPS_COUNT = 4
REG_COUNT = 40
DEMO_COUNT = 6

RAW_FOLDER = "img_1.0"
RAW_SUBSET = "2_meeb person"
REVIEW_FILE = "img_1.0.review.yaml"
CLEAN_FOLDER = "img_1.1"
REG_SUBSET = "reg/1_person"

MEEB_COLOURS: dict[str, Color] = {
    "purple": (160, 110, 210),
    "blue": (90, 140, 220),
    "pink": (230, 120, 180),
    "green": (100, 190, 120),
}
"""The body colours of 1.0's variants; the mascot itself is purple."""

# People wear anything but purple, so the class images never look like a meeb.
SHIRTS: dict[str, Color] = {
    "red": (200, 58, 48),
    "green": (62, 150, 72),
    "orange": (232, 140, 40),
    "teal": (36, 148, 150),
    "yellow": (230, 200, 62),
    "brown": (140, 92, 52),
}

PREP_1_1 = PrepOptions(
    flatten="alternate",
    cull_colour_variants=True,
    trim_to_batch=2,
    repeats=10,
    class_token="none",
)
"""How 1.1 was made from 1.0 (plus the review's drop list): one image per pose with the
colours cycling, white and black backgrounds alternating, cyclopes out, an even count,
10 repeats and the folder named `10_meeb` without the class token."""


def meeb_pose(rng: random.Random, action: str, eyes: int = 2) -> MeebPose:
    """A random pose: prop, placement, size, proportions, face and arms all vary."""

    def jitter() -> tuple[float, float]:
        return rng.uniform(-4, 4), rng.uniform(-4, 4)

    return MeebPose(
        action=action,
        prop=rng.choice(MEEB_PROPS),
        x=rng.uniform(40, 60),
        y=rng.uniform(50, 58),
        zoom=rng.uniform(0.7, 1.1),
        width=rng.uniform(22, 29),
        height=rng.uniform(25, 32),
        eye_gap=rng.uniform(9, 12),
        eye_size=rng.uniform(7, 10),
        gaze=(rng.uniform(-2, 2), rng.uniform(-1.5, 2)),
        mouth=rng.choice(MOUTHS),
        arm_jitter=(jitter(), jitter()),
        mirrored=rng.random() < 0.5,
        eyes=eyes,
    )


def person_pose(rng: random.Random, action: str) -> tuple[PersonPose, str]:
    """A random person and its caption, e.g. `person, waving, red shirt`."""

    def jitter() -> tuple[float, float]:
        return rng.uniform(-4, 4), rng.uniform(-6, 6)

    shirt = rng.choice(sorted(SHIRTS))
    pose = PersonPose(
        action=action,
        shirt=SHIRTS[shirt],
        skin=rng.choice(SKINS),
        x=rng.uniform(35, 65),
        y=rng.uniform(45, 60),
        zoom=rng.uniform(0.6, 1.0),
        spread=rng.uniform(6, 12),
        hand_jitter=(jitter(), jitter()),
    )
    return pose, f"person, {action}, {shirt} shirt"


def _save(folder: Path, name: str, image: Image.Image, caption: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_png(folder / f"{name}.png", image)
    write_text_atomic(folder / f"{name}.txt", caption + "\n")


def write_raw_set(root: Path, rng: random.Random) -> list[str]:
    """Write 1.0's images and captions into `root/2_meeb person`; return the cyclopes'
    paths relative to `root`, for the review."""
    poses = [meeb_pose(rng, MEEB_ACTIONS[index % len(MEEB_ACTIONS)]) for index in range(POSE_COUNT)]
    drawings = [(pose, colour) for pose in poses for colour in MEEB_COLOURS]
    for _ in range(CYCLOPS_COUNT):
        cyclops = meeb_pose(rng, rng.choice(MEEB_ACTIONS), eyes=1)
        drawings.append((cyclops, rng.choice(sorted(MEEB_COLOURS))))
    rng.shuffle(drawings)
    cyclopes = []
    for index, (pose, colour) in enumerate(drawings):
        name = f"meeb_{index:03d}"
        image = draw_meeb(pose, MEEB_COLOURS[colour], SIZE)
        _save(root / RAW_SUBSET, name, image, f"meeb person, {pose.caption}")
        if pose.eyes == 1:
            cyclopes.append(f"{RAW_SUBSET}/{name}.png")
    return cyclopes


def write_review(path: Path, cyclopes: Sequence[str]) -> None:
    """The drop list a person made after looking at every image of 1.0."""
    lines = [
        "# Review of img_1.0: images to drop when making img_1.1, one reason each.",
        "# Used as: prep data/img_1.0 --to data/img_1.1 --drop data/img_1.0.review.yaml ...",
        "drop:",
    ]
    reason = "cyclops: drawn with one eye, the character has two (off-model)"
    lines += [f'  "{name}": "{reason}"' for name in cyclopes]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_reg_set(folder: Path, rng: random.Random) -> None:
    """Write the class images: plain people in a few poses and shirt colours."""
    for index in range(REG_COUNT):
        pose, caption = person_pose(rng, PERSON_ACTIONS[index % len(PERSON_ACTIONS)])
        _save(folder, f"person_{index:02d}", draw_person(pose, SIZE), caption)


def write_demo(data: Path) -> None:
    """Copy the first images of 1.1 and of the reg set, with captions, into `demo/`, and
    the next image of 1.1 into `demo/val/` (the demo's held-out validation image)."""
    clean_subset = data / CLEAN_FOLDER / PREP_1_1.target_folder(RAW_SUBSET)
    for source, target, chosen in (
        (clean_subset, data / "demo" / "train" / clean_subset.name, slice(DEMO_COUNT)),
        (data / REG_SUBSET, data / "demo" / REG_SUBSET, slice(DEMO_COUNT)),
        (clean_subset, data / "demo" / "val" / "1_meeb", slice(DEMO_COUNT, DEMO_COUNT + 1)),
    ):
        target.mkdir(parents=True)
        for image in sorted(source.glob("*.png"))[chosen]:
            for path in (image, image.with_suffix(".txt")):
                shutil.copyfile(path, target / path.name)


def write_all(data: Path) -> None:
    """Write every committed data set into the folder `data`, which must not hold them yet."""
    rng = random.Random(SEED)
    cyclopes = write_raw_set(data / RAW_FOLDER, rng)
    write_review(data / REVIEW_FILE, cyclopes)
    write_reg_set(data / REG_SUBSET, rng)
    prepare(data / RAW_FOLDER, data / CLEAN_FOLDER, PREP_1_1, drop_file=data / REVIEW_FILE)
    write_demo(data)


def regenerate(data: Path) -> None:
    """Rewrite the generated data sets in `data`, leaving anything else there alone.

    Everything is written into a temporary folder first, so a failure leaves the old sets.
    """
    make_folder(data)
    staging = make_temp_folder(data, prefix=".synthetic-")
    try:
        write_all(staging)
        for entry in sorted(staging.iterdir()):
            old = data / entry.name
            if old.is_dir():
                shutil.rmtree(old)
            entry.replace(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """`python -m meebs.tiny.synthetic DIR`: (re)write the generated data sets into DIR."""
    if len(argv) != 1:
        print("usage: python -m meebs.tiny.synthetic DIR   (e.g. data)", file=sys.stderr)
        return 2
    regenerate(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
