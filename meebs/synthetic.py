"""Deterministic cartoon images: "meebs" to train on and plain "person" figures to regularize with.

The demo must run anywhere without downloading a data set, and its result must be
reproducible, so the images are drawn here from a seeded `random.Random` with plain PIL
shapes (no fonts, no clock) and saved with fixed PNG settings: regenerating gives the same
bytes. `python -m meebs.synthetic data/demo` rewrites the committed demo data set.

Shapes are drawn at `SUPERSAMPLE` times the asked size and shrunk with a box filter, which
gives smooth edges (and soft alpha edges on transparent images) from integer shapes.
"""

from __future__ import annotations

import colorsys
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

Color = tuple[int, int, int]

SUPERSAMPLE = 4
UNITS = 100  # drawings are laid out on a 100 x 100 grid, scaled to the image size
DEMO_SEED = 1505
DEMO_SIZE = 64
DEMO_COUNT = 6

# A meeb's pose is an index into POSES; the text goes into its caption.
POSES = ("standing", "waving", "holding a laptop", "holding a phone")

OUTLINE: Color = (38, 22, 52)
WHITE: Color = (255, 255, 255)
# People wear anything but purple, so the class images never look like a meeb.
SHIRTS: dict[str, Color] = {
    "red": (200, 58, 48),
    "green": (62, 150, 72),
    "orange": (232, 140, 40),
    "teal": (36, 148, 150),
    "yellow": (230, 200, 62),
    "brown": (140, 92, 52),
}
SKINS: tuple[Color, ...] = ((255, 219, 180), (241, 194, 160), (224, 172, 130), (141, 85, 54))
TROUSERS: Color = (58, 62, 72)
HAIR: Color = (52, 36, 28)


class _Pen:
    """ImageDraw on the 100-unit grid: every coordinate and width is scaled to the canvas."""

    def __init__(self, image: Image.Image) -> None:
        self._draw = ImageDraw.Draw(image)
        self._scale = image.width / UNITS

    def _xy(self, points: Sequence[float]) -> list[int]:
        return [round(value * self._scale) for value in points]

    def _width(self, units: float) -> int:
        return max(1, round(units * self._scale))

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, fill: Color, outline: float = 2
    ) -> None:
        """An ellipse with a dark outline `outline` units wide (0: none)."""
        box = self._xy((cx - rx, cy - ry, cx + rx, cy + ry))
        border = OUTLINE if outline else None
        self._draw.ellipse(box, fill=fill, outline=border, width=self._width(outline))

    def rectangle(self, box: Sequence[float], fill: Color, radius: float = 1.5) -> None:
        """A rounded rectangle with a thin dark outline."""
        self._draw.rounded_rectangle(
            self._xy(box),
            radius=self._width(radius),
            fill=fill,
            outline=OUTLINE,
            width=self._width(1),
        )

    def limb(
        self, start: tuple[float, float], end: tuple[float, float], fill: Color, width: float = 5
    ) -> None:
        """A thick stroke with round ends: an outlined stroke under a coloured one."""
        for colour, thickness in ((OUTLINE, width + 2), (fill, width)):
            self._draw.line(self._xy((*start, *end)), fill=colour, width=self._width(thickness))
            for x, y in (start, end):
                self.ellipse(x, y, thickness / 2, thickness / 2, colour, outline=0)

    def arc(self, cx: float, cy: float, rx: float, ry: float, start: int, end: int) -> None:
        """A dark arc (a smile) of the ellipse around (cx, cy)."""
        box = self._xy((cx - rx, cy - ry, cx + rx, cy + ry))
        self._draw.arc(box, start, end, fill=OUTLINE, width=self._width(1.5))


def meeb_color(rng: random.Random) -> Color:
    """A random purple: hue 270-300 degrees, medium saturation, bright."""
    hue = rng.uniform(0.75, 0.83)
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 0.6), rng.uniform(0.72, 0.9))
    return _to_color(rgb)


def _to_color(rgb: Sequence[float]) -> Color:
    red, green, blue = (round(channel * 255) for channel in rgb)
    return red, green, blue


def _mix(color: Color, other: Color, amount: float) -> Color:
    red, green, blue = (round(a + (b - a) * amount) for a, b in zip(color, other, strict=True))
    return red, green, blue


def _canvas(size: int, transparent: bool) -> Image.Image:
    big = size * SUPERSAMPLE
    if transparent:
        return Image.new("RGBA", (big, big), (0, 0, 0, 0))
    return Image.new("RGB", (big, big), WHITE)


def _shrink(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BOX)


def draw_meeb(
    rng: random.Random, size: int, color: Color, pose: int, transparent: bool
) -> Image.Image:
    """A meeb: a round purple mascot with two big eyes, stubby limbs and maybe a gadget.

    `pose` indexes `POSES`; `transparent` gives an RGBA image with a clear background,
    otherwise RGB on white. The rng only varies proportions and gaze, never the pose.
    """
    if pose not in range(len(POSES)):
        raise ValueError(f"pose {pose} is not an index into POSES (0..{len(POSES) - 1})")
    image = _canvas(size, transparent)
    pen = _Pen(image)
    cx, cy = 50 + rng.uniform(-3, 3), 55 + rng.uniform(-2, 2)
    rx, ry = rng.uniform(24, 28), rng.uniform(27, 31)
    dark = _mix(color, OUTLINE, 0.35)
    for side in (-1, 1):  # feet and ears first: the body overlaps them
        pen.ellipse(cx + side * 11, cy + ry - 1, 8, 5, dark)
        pen.ellipse(cx + side * rx * 0.55, cy - ry * 0.85, 6, 8, color)
    _draw_arms_behind(pen, pose, cx, cy, rx, dark)
    pen.ellipse(cx, cy, rx, ry, color)
    pen.ellipse(cx, cy + ry * 0.45, rx * 0.55, ry * 0.35, _mix(color, WHITE, 0.45), outline=0)
    _draw_face(pen, rng, cx, cy - ry * 0.25)
    _draw_arms_in_front(pen, pose, cx, cy, rx, dark)
    return _shrink(image, size)


def _draw_face(pen: _Pen, rng: random.Random, cx: float, cy: float) -> None:
    """Two big eyes looking the same way, with pupils and highlights, and a small smile."""
    gap = rng.uniform(9.5, 11.5)
    look_x, look_y = rng.uniform(-2.2, 2.2), rng.uniform(-1.5, 2)
    for side in (-1, 1):
        x = cx + side * gap
        pen.ellipse(x, cy, 8.5, 10, WHITE)
        pen.ellipse(x + look_x, cy + look_y + 1, 4.2, 4.8, OUTLINE, outline=0)
        pen.ellipse(x + look_x - 1.4, cy + look_y - 0.8, 1.4, 1.4, WHITE, outline=0)
    pen.arc(cx, cy + 12, rng.uniform(4, 6), 3.5, 20, 160)


def _draw_arms_behind(pen: _Pen, pose: int, cx: float, cy: float, rx: float, dark: Color) -> None:
    """Arms that hang or wave at the sides start behind the body."""
    pose_name = POSES[pose]
    if pose_name == "holding a laptop":
        return
    left_hand = (cx - rx - 7, cy + 16)
    right_hand = (cx + rx + 9, cy - 20) if pose_name in ("waving", "holding a phone") else None
    pen.limb((cx - rx + 4, cy + 4), left_hand, dark)
    pen.limb((cx + rx - 4, cy + 4), right_hand or (cx + rx + 7, cy + 16), dark)
    if pose_name == "holding a phone":
        x, y = right_hand
        pen.rectangle((x - 4, y - 8, x + 4, y + 6), (44, 44, 52))
        pen.rectangle((x - 2.5, y - 6, x + 2.5, y + 3), (150, 210, 240), radius=0.5)


def _draw_arms_in_front(pen: _Pen, pose: int, cx: float, cy: float, rx: float, dark: Color) -> None:
    """A laptop is held in front of the belly, lid towards the viewer, arms reaching round."""
    if POSES[pose] != "holding a laptop":
        return
    top = cy + 6
    pen.rectangle((cx - 17, top, cx + 17, top + 20), (196, 198, 206))
    pen.ellipse(cx, top + 10, 2.5, 2.5, (236, 238, 242), outline=0)
    pen.rectangle((cx - 20, top + 20, cx + 20, top + 23), (150, 152, 160), radius=0.5)
    for side in (-1, 1):
        pen.limb((cx + side * (rx - 3), cy + 2), (cx + side * 16, top + 14), dark)


def draw_person(rng: random.Random, size: int) -> Image.Image:
    """A plain person: round head, hair, a shirt, stick arms and legs, on white (RGB)."""
    image = _canvas(size, transparent=False)
    pen = _Pen(image)
    skin = rng.choice(SKINS)
    shirt = SHIRTS[rng.choice(sorted(SHIRTS))]
    cx = 50 + rng.uniform(-4, 4)
    spread = rng.uniform(6, 12)
    for side in (-1, 1):
        pen.limb((cx + side * 5, 62), (cx + side * spread, 92), TROUSERS, width=6)
        hand = (cx + side * (14 + rng.uniform(2, 8)), 58 + rng.uniform(-14, 10))
        pen.limb((cx + side * 9, 36), hand, skin, width=4)
    pen.rectangle((cx - 11, 32, cx + 11, 66), shirt, radius=5)
    pen.ellipse(cx, 20, 10, 11, skin)
    pen.ellipse(cx, 12, 10, 5, HAIR, outline=0)
    return _shrink(image, size)


def _save(image: Image.Image, path: Path, caption: str) -> None:
    """PNG with fixed settings and no metadata chunks, plus the caption next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=9)
    path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8", newline="\n")


def write_demo_dataset(root: Path) -> None:
    """Write the demo set: 6 meebs in `train/10_meeb person`, 6 people in `reg/1_person`.

    Every third meeb is RGBA with a transparent background so the trainer's flattening
    is exercised; those captions say "simple background" as the flattening colour varies.
    """
    rng = random.Random(DEMO_SEED)
    for index in range(DEMO_COUNT):
        pose = index % len(POSES)
        transparent = index % 3 == 2
        image = draw_meeb(rng, DEMO_SIZE, meeb_color(rng), pose, transparent)
        background = "simple background" if transparent else "white background"
        caption = f"meeb person, {POSES[pose]}, {background}"
        _save(image, root / "train" / "10_meeb person" / f"meeb_{index:02d}.png", caption)
    for index in range(DEMO_COUNT):
        path = root / "reg" / "1_person" / f"person_{index:02d}.png"
        _save(draw_person(rng, DEMO_SIZE), path, "person, white background")


def main(argv: Sequence[str]) -> int:
    """`python -m meebs.synthetic DIR`: (re)write the demo data set into DIR."""
    if len(argv) != 1:
        print("usage: python -m meebs.synthetic DIR   (e.g. data/demo)", file=sys.stderr)
        return 2
    write_demo_dataset(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
