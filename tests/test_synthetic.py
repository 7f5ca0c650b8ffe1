"""The drawn data sets: reproducible to the byte, laid out as documented, and drawn so that
prep has real work to do (colour variants that differ only in colour, meebs unlike people)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from meebs.data.image_survey import find_similar, survey_image
from meebs.tiny.cartoons import draw_meeb, draw_person
from meebs.tiny.synthetic import (
    CYCLOPS_COUNT,
    MEEB_COLOURS,
    POSE_COUNT,
    REG_COUNT,
    SIZE,
    main,
    meeb_pose,
    person_pose,
)

DATA = Path(__file__).resolve().parents[1] / "data"
RAW = DATA / "img_1.0" / "2_meeb person"


def digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
def test_make_data_regenerates_the_committed_tree_byte_for_byte(tmp_path):
    (tmp_path / "notes.md").write_text("not generated\n", encoding="utf-8")
    stale = tmp_path / "demo" / "train" / "10_meeb person" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an older layout")
    assert main([str(tmp_path)]) == 0
    regenerated = digests(tmp_path)
    assert regenerated.pop("notes.md") == hashlib.sha256(b"not generated\n").hexdigest()
    assert regenerated == digests(DATA), (
        "data/ is out of date with meebs/tiny/synthetic.py: run `make data` and commit the result"
    )


def test_main_wants_one_folder(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_committed_data_stays_small():
    assert sum(path.stat().st_size for path in DATA.rglob("*") if path.is_file()) < 5_000_000


def test_version_1_0_is_every_pose_in_every_colour_plus_the_reviewed_cyclopes():
    images = sorted(RAW.glob("*.png"))
    assert [path.name for path in images] == [f"meeb_{i:03d}.png" for i in range(152)]
    assert len(images) == POSE_COUNT * len(MEEB_COLOURS) + CYCLOPS_COUNT
    facts = [survey_image(path) for path in images]
    assert {f.size for f in facts} == {(SIZE, SIZE)} and all(f.transparent for f in facts)
    groups = find_similar(facts).colour_variants
    assert sorted(len(group) for group in groups) == [len(MEEB_COLOURS)] * POSE_COUNT
    colours = {f.path: f.colour for f in facts}
    assert all({colours[path] for path in group} == set(MEEB_COLOURS) for group in groups)
    review = yaml.safe_load((DATA / "img_1.0.review.yaml").read_text("utf-8"))["drop"]
    loners = {f"2_meeb person/{p.name}" for p in images} - {
        f"2_meeb person/{path.name}" for group in groups for path in group
    }
    assert set(review) == loners and len(loners) == CYCLOPS_COUNT
    assert all("cyclops" in reason for reason in review.values())


def test_colour_variants_share_every_alpha_value_and_differ_in_colour():
    groups = find_similar([survey_image(path) for path in sorted(RAW.glob("*.png"))[:40]])
    pairs = [group[:2] for group in groups.colour_variants]
    assert pairs
    for first, second in pairs:
        a, b = (np.asarray(Image.open(path)) for path in (first, second))
        assert np.array_equal(a[..., 3], b[..., 3]) and not np.array_equal(a, b)


def test_1_0_captions_name_the_subject_and_class_and_file_names_hide_the_pose():
    captions = [path.read_text("utf-8") for path in sorted(RAW.glob("*.txt"))]
    assert len(captions) == 152 and all(c.startswith("meeb person, ") for c in captions)
    assert all(c.endswith("\n") and c.count("\n") == 1 for c in captions)
    # a pose's four colours are spread over the numbering, not next to each other
    groups = find_similar([survey_image(path) for path in sorted(RAW.glob("*.png"))])
    numbers = [[int(path.stem[-3:]) for path in g] for g in groups.colour_variants]
    assert sum(max(n) - min(n) > 8 for n in numbers) > POSE_COUNT // 2


def test_reg_images_are_people_with_person_captions():
    folder = DATA / "reg" / "1_person"
    images = sorted(folder.glob("*.png"))
    assert len(images) == REG_COUNT
    assert {Image.open(path).mode for path in images} == {"RGB"}
    assert all(p.with_suffix(".txt").read_text("utf-8").startswith("person, ") for p in images)


def test_the_demo_is_the_first_six_of_1_1_and_of_reg_and_holds_out_the_seventh():
    for demo, source in (
        (DATA / "demo" / "train" / "10_meeb", DATA / "img_1.1" / "10_meeb"),
        (DATA / "demo" / "reg" / "1_person", DATA / "reg" / "1_person"),
    ):
        first_six = sorted(source.glob("*.png"))[:6]
        expected = {p.name: p.read_bytes() for i in first_six for p in (i, i.with_suffix(".txt"))}
        assert {path.name: path.read_bytes() for path in demo.iterdir()} == expected
    modes = {Image.open(path).mode for path in (DATA / "demo" / "train").rglob("*.png")}
    assert modes == {"RGB"}
    assert sorted(path.name for path in (DATA / "demo").iterdir()) == ["reg", "train", "val"]
    seventh = sorted((DATA / "img_1.1" / "10_meeb").glob("*.png"))[6]
    held_out = DATA / "demo" / "val" / "1_meeb"
    assert sorted(p.name for p in held_out.iterdir()) == [seventh.name, seventh.stem + ".txt"]
    assert (held_out / seventh.name).read_bytes() == seventh.read_bytes()


def test_drawings_repeat_for_a_pose_and_change_with_it():
    def meeb(seed: int, colour: str = "purple") -> Image.Image:
        return draw_meeb(meeb_pose(random.Random(seed), "waving"), MEEB_COLOURS[colour], 64)

    assert meeb(1).tobytes() == meeb(1).tobytes()
    assert meeb(1).tobytes() != meeb(2).tobytes()
    person = person_pose(random.Random(3), "waving")[0]
    assert draw_person(person, 64).tobytes() == draw_person(person, 64).tobytes()
    with pytest.raises(ValueError, match="unknown action"):
        draw_meeb(meeb_pose(random.Random(1), "dancing"), MEEB_COLOURS["blue"], 64)


def _purpleness(image: Image.Image) -> float:
    """Mean of min(red, blue) - green over the image flattened onto white: > 0 means purple."""
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    rgb = np.asarray(Image.alpha_composite(white, image.convert("RGBA")), dtype=float)
    return float(np.mean(np.minimum(rgb[..., 0], rgb[..., 2]) - rgb[..., 1]))


def test_the_mascot_is_purple_and_people_are_not():
    purple = [path for path in sorted(RAW.glob("*.png")) if survey_image(path).colour == "purple"]
    people = sorted((DATA / "reg").rglob("*.png"))
    assert len(purple) >= POSE_COUNT
    assert min(_purpleness(Image.open(path)) for path in purple) > 2
    assert max(_purpleness(Image.open(path)) for path in people) < 0
