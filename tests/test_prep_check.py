"""`prep check`: every kind of problem planted in a small folder is found, one test each,
and a clean folder gives no findings (so each test could fail)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from meebs.cli import main
from meebs.data.prep_check import (
    COLOUR_VARIANTS,
    CORRUPT,
    EMPTY_CAPTION,
    EXACT_DUPLICATES,
    FOLDER_NAME,
    MISSING_CAPTION,
    NEAR_DUPLICATES,
    REMAINDER,
    SMALL,
    TRANSPARENT,
    check_dataset,
)
from meebs.tiny.cartoons import draw_meeb
from meebs.tiny.synthetic import MEEB_COLOURS, meeb_pose

SIZE = 64
SUBSET = "3_meeb person"


def drawing(index: int, colour: str = "purple", background: str | None = "white") -> Image.Image:
    """Drawing number `index` (a distinct pose each), flattened onto `background` unless None."""
    pose = meeb_pose(random.Random(index), "standing")
    image = draw_meeb(pose, MEEB_COLOURS[colour], SIZE)
    if background is None:
        return image
    flat = Image.new("RGBA", image.size, background)
    flat.alpha_composite(image)
    return flat.convert("RGB")


def add_image(folder: Path, name: str, image: Image.Image, caption: str | None = "meeb") -> Path:
    """Save `image` as `folder/name` with a caption file unless `caption` is None."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def clean_dataset(root: Path, count: int = 4) -> Path:
    """`count` distinct, opaque, captioned images in one subset folder: nothing to find."""
    for index in range(count):
        add_image(root / SUBSET, f"img_{index}.png", drawing(index))
    return root / SUBSET


def check(root: Path, batch_size: int = 2):
    return check_dataset(root, resolution=SIZE, batch_size=batch_size)


def paths_of(report, kind: str) -> list[set[str]]:
    return [{path.name for path in finding.paths} for finding in report.of_kind(kind)]


def test_a_clean_folder_has_no_findings(tmp_path):
    clean_dataset(tmp_path)
    report = check(tmp_path)
    assert report.findings == ()
    assert [(row.name, row.images) for row in report.folders] == [(SUBSET, 4)]


def test_transparency_is_found_but_an_all_opaque_alpha_channel_is_not(tmp_path):
    folder = clean_dataset(tmp_path)
    add_image(folder, "clear.png", drawing(10, background=None))
    add_image(folder, "opaque_rgba.png", drawing(11).convert("RGBA"))
    assert paths_of(check(tmp_path), TRANSPARENT) == [{"clear.png"}]


def test_images_below_the_training_resolution_are_found(tmp_path):
    folder = clean_dataset(tmp_path)
    add_image(folder, "small.png", drawing(10).resize((SIZE, SIZE // 2)))
    assert paths_of(check(tmp_path), SMALL) == [{"small.png"}]


def test_missing_captions_are_found(tmp_path):
    folder = clean_dataset(tmp_path)
    add_image(folder, "bare.png", drawing(10), caption=None)
    assert paths_of(check(tmp_path), MISSING_CAPTION) == [{"bare.png"}]
    assert check(tmp_path).of_kind(EMPTY_CAPTION) == []


def test_empty_captions_are_found(tmp_path):
    folder = clean_dataset(tmp_path)
    add_image(folder, "blank.png", drawing(10), caption=" \n")
    assert paths_of(check(tmp_path), EMPTY_CAPTION) == [{"blank.png"}]
    assert check(tmp_path).of_kind(MISSING_CAPTION) == []


def test_corrupt_files_are_found_and_the_check_goes_on(tmp_path):
    folder = clean_dataset(tmp_path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken.txt").write_text("meeb\n", encoding="utf-8")
    report = check(tmp_path)
    assert paths_of(report, CORRUPT) == [{"broken.png"}]
    assert "cannot read image" in report.of_kind(CORRUPT)[0].message
    assert report.folders[0].images == 5 and report.folders[0].corrupt == 1


def test_exact_duplicates_are_found_by_pixels_in_any_file_format(tmp_path):
    folder = clean_dataset(tmp_path)
    add_image(folder, "copy.bmp", drawing(2))  # img_2.png's pixels, another format
    report = check(tmp_path)
    assert paths_of(report, EXACT_DUPLICATES) == [{"img_2.png", "copy.bmp"}]
    assert report.of_kind(NEAR_DUPLICATES) == [] and report.of_kind(COLOUR_VARIANTS) == []


def test_near_duplicates_are_found(tmp_path):
    folder = clean_dataset(tmp_path)
    slightly_brighter = ImageEnhance.Brightness(drawing(1)).enhance(1.05)
    add_image(folder, "edited.png", slightly_brighter)
    add_image(folder, "recompressed.jpg", drawing(3))
    report = check(tmp_path)
    found = paths_of(report, NEAR_DUPLICATES)
    assert sorted(found, key=sorted) == [
        {"edited.png", "img_1.png"},
        {"img_3.png", "recompressed.jpg"},
    ]
    assert report.of_kind(EXACT_DUPLICATES) == [] and report.of_kind(COLOUR_VARIANTS) == []


def test_colour_variants_of_one_drawing_are_grouped_from_the_pixels(tmp_path):
    folder = clean_dataset(tmp_path)
    add_image(folder, "zz_green.png", drawing(0, "green"))
    add_image(folder, "aa_blue.png", drawing(0, "blue"))
    add_image(folder, "mm_pink.png", drawing(5, "pink"))  # a drawing of its own
    report = check(tmp_path)
    assert paths_of(report, COLOUR_VARIANTS) == [{"img_0.png", "zz_green.png", "aa_blue.png"}]
    message = report.of_kind(COLOUR_VARIANTS)[0].message
    assert "(blue)" in message and "(green)" in message and "(purple)" in message
    assert report.of_kind(NEAR_DUPLICATES) == []


def test_the_remainder_of_count_over_batch_size_is_found(tmp_path):
    clean_dataset(tmp_path, count=5)
    report = check(tmp_path, batch_size=2)
    assert [finding.paths for finding in report.of_kind(REMAINDER)] == [(tmp_path / SUBSET,)]
    assert "5 images, 1 more than a multiple of the batch size 2" in report.findings[0].message
    assert report.folders[0].remainder == 1
    assert check(tmp_path, batch_size=5).findings == ()


def test_a_folder_kohya_would_skip_is_found(tmp_path):
    clean_dataset(tmp_path)
    add_image(tmp_path / "meeb", "x.png", drawing(9))
    assert paths_of(check(tmp_path), FOLDER_NAME) == [{"meeb"}]


def test_the_cli_prints_a_table_and_findings_and_exits_0(tmp_path, capsys):
    folder = clean_dataset(tmp_path, count=3)
    add_image(folder, "bare.png", drawing(10), caption=None)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert main(["prep", "check", str(tmp_path), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert SUBSET in out and "missing caption: 1 of 4 images" in out
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prep", "check", "no/such/folder"], "no/such/folder does not exist"),
        (["prep", "check", "x", "--to", "y"], "prep check changes nothing: drop --to"),
        (["prep", "x"], "prep DIR --to NEWDIR"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err.replace("\n", "") and "Traceback" not in err
