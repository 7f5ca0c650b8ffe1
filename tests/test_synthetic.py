"""The drawn demo data set: reproducible to the byte, the right shapes, meebs unlike people."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meebs.synthetic import POSES, draw_meeb, draw_person, main, meeb_color, write_demo_dataset

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
PURPLE = (150, 100, 200)


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_regenerating_gives_the_committed_demo_files_byte_for_byte(tmp_path):
    write_demo_dataset(tmp_path)
    assert _digests(tmp_path) == _digests(DEMO), (
        "data/demo is out of date with meebs/synthetic.py: "
        "run `python -m meebs.synthetic data/demo` and commit the result"
    )


def test_demo_layout_captions_and_size():
    names = sorted(_digests(DEMO))
    assert names[:12] == [
        f"reg/1_person/person_{i:02d}.{ext}" for i in range(6) for ext in ("png", "txt")
    ]
    assert names[12:] == [
        f"train/10_meeb person/meeb_{i:02d}.{ext}" for i in range(6) for ext in ("png", "txt")
    ]
    caption = (DEMO / "train" / "10_meeb person" / "meeb_02.txt").read_text("utf-8")
    assert caption == "meeb person, holding a laptop, simple background\n"
    assert sum(path.stat().st_size for path in DEMO.rglob("*")) < 100_000


def test_demo_images_have_the_expected_sizes_and_modes():
    meebs = [Image.open(path) for path in sorted((DEMO / "train").rglob("*.png"))]
    people = [Image.open(path) for path in sorted((DEMO / "reg").rglob("*.png"))]
    assert {image.size for image in meebs + people} == {(64, 64)}
    assert [image.mode for image in meebs] == ["RGB", "RGB", "RGBA"] * 2
    assert {image.mode for image in people} == {"RGB"}
    alpha = np.asarray(meebs[2])[..., 3]
    assert alpha[0, 0] == 0 and alpha[32, 32] == 255  # clear corner, opaque body


def test_main_writes_the_demo_set_and_wants_one_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    assert _digests(tmp_path) == _digests(DEMO)
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_drawings_repeat_for_a_seed_and_change_with_it():
    def meeb(seed: int) -> bytes:
        return draw_meeb(random.Random(seed), 64, PURPLE, 1, False).tobytes()

    def person(seed: int) -> bytes:
        return draw_person(random.Random(seed), 64).tobytes()

    assert meeb(1) == meeb(1)
    assert meeb(1) != meeb(2)
    assert person(1) == person(1)
    assert person(1) != person(2)


def test_every_pose_draws_a_distinct_meeb_and_others_are_refused():
    drawings = {draw_meeb(random.Random(0), 48, PURPLE, pose, True).tobytes() for pose in range(4)}
    assert len(drawings) == len(POSES)
    with pytest.raises(ValueError, match="pose 4"):
        draw_meeb(random.Random(0), 48, PURPLE, len(POSES), False)


def _purpleness(image: Image.Image) -> float:
    """Mean of min(red, blue) - green over the image flattened onto white: > 0 means purple."""
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = np.asarray(Image.alpha_composite(white, image.convert("RGBA")), dtype=float)
    return float(np.mean(np.minimum(rgb[..., 0], rgb[..., 2]) - rgb[..., 1]))


def test_meebs_are_purple_and_people_are_not():
    rng = random.Random(7)
    meebs = [draw_meeb(rng, 64, meeb_color(rng), pose, pose == 2) for pose in range(4)]
    people = [draw_person(rng, 64) for _ in range(8)]
    assert min(map(_purpleness, meebs)) > 5
    assert max(map(_purpleness, people)) < 0
