"""`prep DIR --to NEWDIR`: 1.0 becomes 1.1 with a reason for every dropped image, the source
never changes, and each step does what it says on small folders."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_prep_check import SUBSET, add_image, clean_dataset, drawing

from meebs.cli import main
from meebs.data.folders import scan_dataset
from meebs.data.image_survey import survey_image
from meebs.data.prep import prepare
from meebs.data.prep_options import PrepOptions
from meebs.data.prep_record import JSON_NAME, MARKDOWN_NAME
from meebs.errors import DataError
from meebs.tiny.synthetic import PREP_1_1

DATA = Path(__file__).resolve().parents[1] / "data"
RAW = DATA / "img_1.0"
REVIEW = DATA / "img_1.0.review.yaml"


def digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def version_1_1(tmp_path_factory):
    """prep of the committed 1.0 with 1.1's options, and the source's digests around it."""
    target = tmp_path_factory.mktemp("prep") / "img_1.1"
    before = digests(RAW)
    prepare(RAW, target, PREP_1_1, drop_file=REVIEW)
    return target, before, digests(RAW)


def test_1_0_becomes_36_flattened_images_with_even_colours_and_backgrounds(version_1_1):
    target, _, _ = version_1_1
    images = sorted((target / "10_meeb").glob("*.png"))
    assert len(images) == 36 and len(list((target / "10_meeb").glob("*.txt"))) == 36
    facts = [survey_image(path) for path in images]
    assert not any(f.transparent for f in facts)
    assert Counter(f.colour for f in facts) == {"purple": 9, "blue": 9, "pink": 9, "green": 9}
    corners = Counter(Image.open(path).convert("RGB").getpixel((0, 0)) for path in images)
    assert corners == {(255, 255, 255): 18, (0, 0, 0): 18}


def test_captions_lose_the_class_token_and_the_dataset_scans_with_the_record_beside_it(
    version_1_1,
):
    target, _, _ = version_1_1
    scan = scan_dataset(target, None, ".txt", (512, 512))
    assert [(s.folder.name, s.repeats, s.tokens) for s in scan.train] == [("10_meeb", 10, "meeb")]
    assert scan.num_train_images == 36 and scan.warnings == ()
    assert all(item.caption.startswith("meeb, ") for item in scan.train[0].images)
    assert not any("person" in item.caption for item in scan.train[0].images)


def test_the_record_explains_every_dropped_image(version_1_1):
    target, before, _ = version_1_1
    record = json.loads((target / JSON_NAME).read_text("utf-8"))
    sources = [entry["source"] for entry in record["images"]]
    assert sorted(sources) == sorted(name for name in before if name.endswith(".png"))
    dropped = [entry for entry in record["images"] if entry["result"] == "dropped"]
    assert len(dropped) == 152 - 36 and all(entry["reason"].strip() for entry in dropped)
    review = yaml.safe_load(REVIEW.read_text("utf-8"))["drop"]
    by_review = {e["source"]: e["reason"] for e in dropped if e["step"] == "drop list"}
    assert by_review == review and len(review) == 4
    assert Counter(e["step"] for e in dropped) == {"drop list": 4, "colour variant": 111, "trim": 1}
    kept = {e["target"] for e in record["images"] if e["result"] == "kept"}
    assert kept == {f"10_meeb/{path.name}" for path in (target / "10_meeb").glob("*.png")}
    markdown = (target / MARKDOWN_NAME).read_text("utf-8")
    assert all(f"| {entry['source']} | dropped" in markdown for entry in dropped)


def test_culled_images_are_colour_variants_of_a_kept_image(version_1_1):
    """What the record claims, checked on the pixels: same alpha mask, other colour."""
    target, _, _ = version_1_1
    record = json.loads((target / JSON_NAME).read_text("utf-8"))
    culled = [entry for entry in record["images"] if entry.get("step") == "colour variant"]
    alpha = {path.name: np.asarray(Image.open(path))[..., 3] for path in RAW.rglob("*.png")}
    for entry in culled:
        kept = entry["reason"].split(" variant of ")[1].split(",")[0]
        assert np.array_equal(alpha[Path(entry["source"]).name], alpha[Path(kept).name])
        assert survey_image(RAW / entry["source"]).colour != survey_image(RAW / kept).colour


def test_prep_of_the_committed_1_0_gives_the_committed_1_1(version_1_1):
    target, _, _ = version_1_1
    assert digests(target) == digests(DATA / "img_1.1")


def test_the_source_folder_is_unchanged(version_1_1):
    _, before, after = version_1_1
    assert after == before


def test_an_existing_target_is_refused_and_left_alone(tmp_path, capsys):
    clean_dataset(tmp_path / "src")
    target = tmp_path / "new"
    target.mkdir()
    (target / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match="already exists"):
        prepare(tmp_path / "src", target, PrepOptions())
    assert main(["prep", str(tmp_path / "src"), "--to", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [path.name for path in target.iterdir()] == ["keep.txt"]


def test_a_target_inside_the_source_is_refused(tmp_path):
    clean_dataset(tmp_path)
    with pytest.raises(DataError, match="never changes its source"):
        prepare(tmp_path, tmp_path / SUBSET / "clean", PrepOptions())


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("white", {"white": 4}), ("black", {"black": 4}), ("alternate", {"white": 2, "black": 2})],
)
def test_flattening_onto_white_black_or_alternating(tmp_path, mode, expected):
    for index in range(4):
        add_image(tmp_path / "src" / SUBSET, f"img_{index}.png", drawing(index, background=None))
    add_image(tmp_path / "src" / SUBSET, "opaque.png", drawing(9))
    prepare(tmp_path / "src", tmp_path / "new", PrepOptions(flatten=mode))
    folder = tmp_path / "new" / SUBSET
    names = {0: "black", 255: "white"}
    corners = Counter(
        names[Image.open(folder / f"img_{i}.png").convert("L").getpixel((0, 0))] for i in range(4)
    )
    assert corners == expected
    assert (folder / "opaque.png").read_bytes() == (
        tmp_path / "src" / SUBSET / "opaque.png"
    ).read_bytes()


def test_trimming_drops_the_last_image_of_the_most_common_colour(tmp_path):
    folder = tmp_path / "src" / SUBSET
    for index, colour in enumerate(("blue", "green", "green", "purple", "blue", "green", "pink")):
        add_image(folder, f"img_{index}.png", drawing(index, colour))
    decisions = prepare(tmp_path / "src", tmp_path / "new", PrepOptions(trim_to_batch=2))
    assert [d.source for d in decisions if not d.kept] == [f"{SUBSET}/img_5.png"]
    assert "most common colour (3 of 7)" in decisions[5].reason
    assert len(list((tmp_path / "new" / SUBSET).glob("*.png"))) == 6


def test_repeats_and_class_token_keep_rename_the_folder_only(tmp_path):
    clean_dataset(tmp_path / "src")
    (tmp_path / "src" / SUBSET / "img_0.txt").write_text("meeb person, waving\n", "utf-8")
    prepare(tmp_path / "src", tmp_path / "new", PrepOptions(repeats=7))
    assert (tmp_path / "new" / "7_meeb person" / "img_0.txt").read_text("utf-8") == (
        "meeb person, waving\n"
    )


def test_drop_list_mistakes_are_one_clear_error(tmp_path):
    clean_dataset(tmp_path / "src")
    drop = tmp_path / "review.yaml"
    for text, expected in (
        ('drop:\n  "3_meeb person/nope.png": "gone"\n', "not an image of the dataset"),
        ('drop:\n  "3_meeb person/img_0.png": ""\n', "has no reason"),
        ("- just a list\n", "needs a mapping 'drop:'"),
    ):
        drop.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=expected):
            prepare(tmp_path / "src", tmp_path / "new", PrepOptions(), drop_file=drop)
        assert not (tmp_path / "new").exists()


def test_a_corrupt_image_stops_prep_unless_the_review_drops_it(tmp_path):
    folder = clean_dataset(tmp_path / "src")
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken\.png"):
        prepare(tmp_path / "src", tmp_path / "new", PrepOptions())
    assert not (tmp_path / "new").exists()
    drop = tmp_path / "review.yaml"
    drop.write_text(f'drop:\n  "{SUBSET}/broken.png": "corrupt download"\n', encoding="utf-8")
    prepare(tmp_path / "src", tmp_path / "new", PrepOptions(), drop_file=drop)
    assert sorted(path.name for path in (tmp_path / "new" / SUBSET).glob("*.png")) == [
        f"img_{i}.png" for i in range(4)
    ]
