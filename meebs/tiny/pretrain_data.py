"""Pictures drawn fresh from the generators, for pretraining the tiny base and its scorer.

Three users, three mixes, one drawing function:

- the UNet and text encoder see only `CLASS_KINDS` (people, shapes, made-up creatures):
  never a meeb, so the demo LoHA is what teaches "meeb";
- the VAE is a compressor and may see everything, meebs included (`VAE_KINDS`), so the
  meeb look survives the round trip to latents and back;
- the scorer learns to tell a meeb from a person from anything else (`SCORER_LABELS`).

Every picture is drawn from a seeded `random.Random` and flattened onto white or black,
as the meeb data sets are; a seed always gives the same pixels and captions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from meebs.tiny.cartoons import MEEB_ACTIONS, PERSON_ACTIONS, Color, draw_meeb, draw_person
from meebs.tiny.class_looks import CREATURES, SHAPES, draw_creature, draw_shape
from meebs.tiny.synthetic import MEEB_COLOURS, meeb_pose, person_pose

PALETTE: dict[str, Color] = {
    "red": (210, 60, 50),
    "orange": (235, 145, 40),
    "yellow": (232, 205, 60),
    "green": (70, 160, 80),
    "teal": (40, 150, 150),
    "blue": (70, 110, 215),
    "purple": (150, 95, 205),
    "pink": (232, 125, 180),
    "brown": (140, 92, 52),
    "grey": (140, 140, 150),
}
BACKGROUNDS: tuple[Color, ...] = ((255, 255, 255), (0, 0, 0))

CLASS_KINDS = ("person", "shape", "creature")
VAE_KINDS = ("person", "shape", "creature", "meeb")
SCORER_LABELS = ("meeb", "person", "other")
"""The scorer's classes, in the order of its outputs."""


@dataclass(frozen=True)
class Drawing:
    """One picture: RGB on a flat background, its caption, and what it shows."""

    image: Image.Image
    caption: str
    kind: str


def draw(rng: random.Random, kind: str, size: int) -> Drawing:
    """A random drawing of `kind` ('person', 'shape', 'creature' or 'meeb'), `size` px."""
    background = rng.choice(BACKGROUNDS)
    if kind == "person":
        pose, caption = person_pose(rng, rng.choice(PERSON_ACTIONS))
        picture = draw_person(pose, size, transparent=True)
    elif kind == "shape":
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(PALETTE))
        picture = draw_shape(
            shape,
            PALETTE[colour],
            rng.uniform(30, 70),
            rng.uniform(30, 70),
            rng.uniform(14, 32),
            rng.uniform(0, 360),
            size,
        )
        caption = f"{colour} {shape}"
    elif kind == "creature":
        word, colour = rng.choice(CREATURES), rng.choice(sorted(PALETTE))
        picture = draw_creature(
            word,
            PALETTE[colour],
            rng.uniform(40, 60),
            rng.uniform(45, 60),
            rng.uniform(0.7, 1.1),
            rng.random() < 0.5,
            size,
        )
        caption = f"{word}, {colour}"
    elif kind == "meeb":
        pose = meeb_pose(rng, rng.choice(MEEB_ACTIONS))
        colours = {**MEEB_COLOURS, **PALETTE}
        colour = rng.choice(sorted(colours))
        picture = draw_meeb(pose, colours[colour], size)
        caption = f"meeb, {pose.caption}"
    else:
        raise ValueError(f"unknown kind {kind!r}")
    flat = Image.new("RGB", picture.size, background)
    flat.paste(picture, mask=picture.getchannel("A"))
    return Drawing(flat, caption, kind)


def draw_many(seed: int, kinds: tuple[str, ...], count: int, size: int) -> list[Drawing]:
    """`count` drawings, kinds taken in turn so every kind gets its share."""
    rng = random.Random(seed)
    return [draw(rng, kinds[index % len(kinds)], size) for index in range(count)]


def to_tensor(drawings: list[Drawing]) -> torch.Tensor:
    """Images as one float tensor in [-1, 1], shaped (N, 3, H, W), as the VAE takes them."""
    array = np.stack([np.asarray(drawing.image, dtype=np.uint8) for drawing in drawings])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def scorer_label(kind: str) -> int:
    """The scorer's class for a drawing kind: shapes and creatures are both 'other'."""
    return SCORER_LABELS.index(kind if kind in SCORER_LABELS else "other")
