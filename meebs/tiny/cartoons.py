"""Drawing one cartoon with plain PIL shapes: a "meeb" mascot or a plain "person".

Everything a drawing depends on is in its spec (`MeebPose`, `PersonPose`) and its colour,
so a data set generator can draw the same pose in several colours, and the same spec
always gives the same pixels (no fonts, no clock, no randomness in here).

Shapes are drawn at `SUPERSAMPLE` times the asked size and shrunk with a box filter, which
gives smooth edges (and soft alpha edges on transparent images) from integer shapes.
Coordinates are on a 100 x 100 grid scaled to the image; a meeb is drawn around its own
centre and then placed and scaled, so poses can also differ in placement and size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

Color = tuple[int, int, int]
Point = tuple[float, float]

SUPERSAMPLE = 2
UNITS = 100

OUTLINE: Color = (38, 22, 52)
WHITE: Color = (255, 255, 255)
SCREEN: Color = (150, 210, 240)
GADGET: Color = (44, 44, 52)
SILVER: Color = (196, 198, 206)
SKINS: tuple[Color, ...] = ((255, 219, 180), (241, 194, 160), (224, 172, 130), (141, 85, 54))
TROUSERS: Color = (58, 62, 72)
HAIR: Color = (52, 36, 28)

MEEB_ACTIONS = ("standing", "waving", "cheering", "pointing", "shrugging")
"""What a meeb's arms do; a prop held in both hands overrides it."""
MEEB_PROPS = ("nothing", "a phone", "a mug", "a laptop", "a book")
TWO_HANDED = ("a laptop", "a book")
MOUTHS = ("smile", "open", "grin")
PERSON_ACTIONS = ("standing", "waving", "arms raised")

# Where a hand goes, per action, relative to the shoulder: (left hand, right hand).
_HANDS: dict[str, tuple[Point, Point]] = {
    "standing": ((-10, 14), (10, 14)),
    "waving": ((-10, 14), (12, -22)),
    "cheering": ((-12, -22), (12, -22)),
    "pointing": ((-10, 14), (22, -2)),
    "shrugging": ((-18, -6), (18, -6)),
}


@dataclass(frozen=True)
class MeebPose:
    """Everything about a meeb drawing except its body colour."""

    action: str
    prop: str
    x: float
    """Centre on the 100-unit grid."""
    y: float
    zoom: float
    """Size relative to a meeb that fills most of the image (1.0)."""
    width: float
    """Body radii in units at zoom 1."""
    height: float
    eye_gap: float
    eye_size: float
    gaze: Point
    mouth: str
    arm_jitter: tuple[Point, Point]
    """Offsets added to both hands, so poses of one action still differ."""
    mirrored: bool
    eyes: int = 2
    """2 for a meeb; 1 draws the off-model "cyclops" the 1.0 data set had by mistake."""

    @property
    def caption(self) -> str:
        """The tags after the subject, e.g. `waving, holding a phone`."""
        if self.prop in TWO_HANDED:
            return f"holding {self.prop}"
        if self.prop == "nothing":
            return self.action
        return f"{self.action}, holding {self.prop}"


@dataclass(frozen=True)
class PersonPose:
    """A plain person: the class images that keep "person" from drifting towards meebs."""

    action: str
    shirt: Color
    skin: Color
    x: float
    """Centre (of the shirt) on the 100-unit grid."""
    y: float
    zoom: float
    spread: float
    """How far apart the feet are, in units at zoom 1."""
    hand_jitter: tuple[Point, Point]


class Pen:
    """ImageDraw on the 100-unit grid, around an origin and with a zoom: every coordinate
    and width is scaled, so a drawing can be placed and sized without changing its code."""

    def __init__(self, image: Image.Image, origin: Point = (0, 0), zoom: float = 1) -> None:
        self._draw = ImageDraw.Draw(image)
        self._scale = image.width / UNITS * zoom
        self._origin = (origin[0] * image.width / UNITS, origin[1] * image.width / UNITS)

    def _xy(self, points: Sequence[float]) -> list[int]:
        return [
            round(self._origin[index % 2] + value * self._scale)
            for index, value in enumerate(points)
        ]

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

    def limb(self, start: Point, end: Point, fill: Color, width: float = 5) -> None:
        """A thick stroke with round ends: an outlined stroke under a coloured one."""
        for colour, thickness in ((OUTLINE, width + 2), (fill, width)):
            self._draw.line(self._xy((*start, *end)), fill=colour, width=self._width(thickness))
            for x, y in (start, end):
                self.ellipse(x, y, thickness / 2, thickness / 2, colour, outline=0)

    def polygon(self, points: Sequence[Point], fill: Color, outline: float = 2) -> None:
        """A filled polygon with a dark outline `outline` units wide (0: none)."""
        flat = self._xy([value for point in points for value in point])
        corners = list(zip(flat[::2], flat[1::2], strict=True))
        border = OUTLINE if outline else None
        self._draw.polygon(corners, fill=fill, outline=border, width=self._width(outline))

    def arc(self, cx: float, cy: float, rx: float, ry: float, start: int, end: int) -> None:
        """A dark arc (a smile) of the ellipse around (cx, cy)."""
        box = self._xy((cx - rx, cy - ry, cx + rx, cy + ry))
        self._draw.arc(box, start, end, fill=OUTLINE, width=self._width(1.5))


def mix(color: Color, other: Color, amount: float) -> Color:
    """`color` moved `amount` (0..1) of the way towards `other`."""
    red, green, blue = (round(a + (b - a) * amount) for a, b in zip(color, other, strict=True))
    return red, green, blue


def canvas(size: int, transparent: bool) -> Image.Image:
    big = size * SUPERSAMPLE
    if transparent:
        return Image.new("RGBA", (big, big), (0, 0, 0, 0))
    return Image.new("RGB", (big, big), WHITE)


def shrink(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BOX)


def draw_meeb(pose: MeebPose, color: Color, size: int) -> Image.Image:
    """A meeb: a round mascot in `color` with big eyes, stubby limbs and maybe a prop, on a
    transparent background (RGBA). Only the body and its shades take `color`, so two
    colours of one pose differ in nothing else."""
    if pose.action not in _HANDS or pose.prop not in MEEB_PROPS or pose.mouth not in MOUTHS:
        raise ValueError(f"unknown action, prop or mouth in {pose}")
    image = canvas(size, transparent=True)
    pen = Pen(image, (pose.x, pose.y), pose.zoom)
    rx, ry = pose.width, pose.height
    dark = mix(color, OUTLINE, 0.35)
    for side in (-1, 1):  # feet and ears first: the body overlaps them
        pen.ellipse(side * 11, ry - 1, 8, 5, dark)
        pen.ellipse(side * rx * 0.55, -ry * 0.85, 6, 8, color)
    if pose.prop not in TWO_HANDED:
        _draw_arms(pen, pose, rx, dark)
    pen.ellipse(0, 0, rx, ry, color)
    pen.ellipse(0, ry * 0.45, rx * 0.55, ry * 0.35, mix(color, WHITE, 0.45), outline=0)
    _draw_face(pen, pose, -ry * 0.25)
    if pose.prop in TWO_HANDED:
        _draw_held_in_front(pen, pose.prop, rx, dark)
    shrunk = shrink(image, size)
    return shrunk.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if pose.mirrored else shrunk


def _draw_face(pen: Pen, pose: MeebPose, cy: float) -> None:
    """Big eyes looking the same way, with pupils and highlights, and a mouth."""
    look_x, look_y = pose.gaze
    centres = (0.0,) if pose.eyes == 1 else (-pose.eye_gap, pose.eye_gap)
    for x in centres:
        size = pose.eye_size * (1.3 if pose.eyes == 1 else 1)
        pen.ellipse(x, cy, size, size * 1.15, WHITE)
        pen.ellipse(x + look_x, cy + look_y + 1, size / 2, size * 0.56, OUTLINE, outline=0)
        pen.ellipse(x + look_x - 1.4, cy + look_y - 0.8, 1.4, 1.4, WHITE, outline=0)
    mouth_y = cy + pose.eye_size + 4
    if pose.mouth == "open":
        pen.ellipse(0, mouth_y + 1, 3.5, 2.5, (150, 40, 60), outline=1)
    else:
        width = 6 if pose.mouth == "grin" else 4.5
        pen.arc(0, mouth_y, width, 3.5, 15 if pose.mouth == "grin" else 25, 165)


def _draw_arms(pen: Pen, pose: MeebPose, rx: float, dark: Color) -> None:
    """Arms behind the body, hands where the action puts them, a phone or mug in a hand."""
    hands = []
    for side, hand, jitter in zip((-1, 1), _HANDS[pose.action], pose.arm_jitter, strict=True):
        shoulder = (side * (rx - 4), 4)
        end = (shoulder[0] + hand[0] + jitter[0], shoulder[1] + hand[1] + jitter[1])
        pen.limb(shoulder, end, dark)
        hands.append(end)
    (left_x, left_y), (right_x, right_y) = hands
    if pose.prop == "a phone":
        pen.rectangle((right_x - 4, right_y - 8, right_x + 4, right_y + 6), GADGET)
        pen.rectangle((right_x - 2.5, right_y - 6, right_x + 2.5, right_y + 3), SCREEN, 0.5)
    if pose.prop == "a mug":
        pen.ellipse(left_x - 5, left_y - 2, 3, 3.5, (236, 236, 236), outline=1.5)
        pen.rectangle((left_x - 4, left_y - 7, left_x + 5, left_y + 5), (220, 70, 60), 1)


def _draw_held_in_front(pen: Pen, prop: str, rx: float, dark: Color) -> None:
    """A laptop (lid towards the viewer) or an open book in front of the belly, arms round."""
    top = 6
    if prop == "a laptop":
        pen.rectangle((-17, top, 17, top + 20), SILVER)
        pen.ellipse(0, top + 10, 2.5, 2.5, (236, 238, 242), outline=0)
        pen.rectangle((-20, top + 20, 20, top + 23), (150, 152, 160), radius=0.5)
    else:
        pen.rectangle((-18, top, 18, top + 22), (60, 110, 180))  # the cover
        pen.rectangle((-16, top + 2, 0, top + 20), WHITE, radius=0.5)
        pen.rectangle((0, top + 2, 16, top + 20), WHITE, radius=0.5)
    for side in (-1, 1):
        pen.limb((side * (rx - 3), 2), (side * 16, top + 14), dark)


def draw_person(pose: PersonPose, size: int, transparent: bool = False) -> Image.Image:
    """A plain person: round head, hair, a shirt, stick arms and legs, on white (RGB), or
    on a transparent background (RGBA)."""
    image = canvas(size, transparent=transparent)
    pen = Pen(image, (pose.x, pose.y), pose.zoom)
    for side, jitter in zip((-1, 1), pose.hand_jitter, strict=True):
        pen.limb((side * 5, 7), (side * pose.spread, 37), TROUSERS, width=6)
        raised = pose.action == "arms raised" or (pose.action == "waving" and side == 1)
        hand = (side * 18 + jitter[0], (-37 if raised else 7) + jitter[1])
        pen.limb((side * 9, -19), hand, pose.skin, width=4)
    pen.rectangle((-11, -23, 11, 11), pose.shirt, radius=5)
    pen.ellipse(0, -35, 10, 11, pose.skin)
    pen.ellipse(0, -43, 10, 5, HAIR, outline=0)
    return shrink(image, size)
