"""The looks a base model may learn before it ever sees a meeb: shapes and made-up creatures.

The `tiny-trained` base (see `meebs.tiny.pretrain_tiny`) is pretrained on people, plain shapes
and a few creatures named by made-up words. The creatures are there so the text encoder
learns that an unknown word changes the picture (the trick a LoHA relies on to teach it
"meeb"), and each has a look of its own that is not a meeb's: no round two-eyed body with
ears and feet. Like `meebs.tiny.cartoons`, every function draws exactly what its arguments say.
"""

from __future__ import annotations

import math

from PIL import Image

from meebs.tiny.cartoons import OUTLINE, WHITE, Color, Pen, canvas, mix, shrink

SHAPES = ("circle", "square", "triangle", "star")
CREATURES = ("blick", "zorp", "tovi", "glim")
"""Made-up words, each bound to one look: a boxy robot, a one-eyed cone, a caterpillar of
beads and a spiky sun. None tokenizes into the pieces of "meeb" ('mee', 'b</w>')."""


def draw_shape(
    kind: str, color: Color, x: float, y: float, radius: float, turn: float, size: int
) -> Image.Image:
    """One outlined shape of `radius` units around (x, y), turned `turn` degrees, on a
    transparent background."""
    image = canvas(size, transparent=True)
    pen = Pen(image, (x, y))
    if kind == "circle":
        pen.ellipse(0, 0, radius, radius, color)
    elif kind in ("square", "triangle", "star"):
        pen.polygon(_corners(kind, radius, turn), color)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return shrink(image, size)


def _corners(kind: str, radius: float, turn: float) -> list[tuple[float, float]]:
    count, inner = {"square": (4, None), "triangle": (3, None), "star": (5, 0.45)}[kind]
    points = []
    for index in range(count * (2 if inner else 1)):
        angle = math.radians(turn) + index * math.pi / (count if inner else count / 2)
        length = radius * (inner if inner and index % 2 else 1)
        points.append((length * math.sin(angle), -length * math.cos(angle)))
    return points


def draw_creature(
    word: str, color: Color, x: float, y: float, zoom: float, mirrored: bool, size: int
) -> Image.Image:
    """The creature a made-up word names, in `color`, on a transparent background."""
    image = canvas(size, transparent=True)
    pen = Pen(image, (x, y), zoom)
    dark = mix(color, OUTLINE, 0.35)
    if word == "blick":  # a boxy robot: antenna, square head with a visor, box body, legs
        pen.limb((0, -42), (0, -32), dark, width=2)
        pen.ellipse(0, -43, 3, 3, (230, 60, 60))
        for side in (-1, 1):
            pen.limb((side * 8, 18), (side * 10, 34), dark, width=5)
        pen.rectangle((-16, -4, 16, 22), color, radius=2)
        pen.rectangle((-12, -32, 12, -6), mix(color, WHITE, 0.3), radius=2)
        pen.rectangle((-9, -24, 9, -16), (40, 220, 200), radius=1)
    elif word == "zorp":  # a cone with one wide eye and three legs
        for leg in (-12, 0, 12):
            pen.limb((leg, 20), (leg * 1.3, 34), dark, width=4)
        pen.polygon([(0, -38), (26, 24), (-26, 24)], color)
        pen.ellipse(0, 0, 9, 6, WHITE)
        pen.ellipse(2, 0, 3, 3, OUTLINE, outline=0)
    elif word == "tovi":  # a caterpillar: a row of beads rising to a head with antennae
        for index in range(5):
            pen.ellipse(-28 + index * 12, 14 - index * 4, 9, 9, color if index % 2 else dark)
        pen.limb((22, -12), (26, -26), OUTLINE, width=1.5)
        pen.limb((28, -10), (34, -22), OUTLINE, width=1.5)
        pen.ellipse(26, -4, 11, 10, color)
        pen.ellipse(30, -6, 2, 2, OUTLINE, outline=0)
    elif word == "glim":  # a spiky sun: a ring of long rays round a small disc, no face
        rays = [
            (
                math.sin(k * math.pi / 8) * (34 if k % 2 else 16),
                -math.cos(k * math.pi / 8) * (34 if k % 2 else 16),
            )
            for k in range(16)
        ]
        pen.polygon(rays, color)
        pen.ellipse(0, 0, 12, 12, mix(color, WHITE, 0.5))
    else:
        raise ValueError(f"unknown creature {word!r}")
    shrunk = shrink(image, size)
    return shrunk.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else shrunk
