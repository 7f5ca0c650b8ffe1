"""Dataset scanning, kohya reg balancing, batching, captions and pixel loading."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from meebs.data.batches import count_batches, plan_batches, process_caption
from meebs.data.folders import (
    ImageItem,
    balanced_reg_samples,
    epoch_samples,
    parse_subset_name,
    scan_dataset,
)
from meebs.data.images import background_for, load_image
from meebs.errors import DataError

RESOLUTION = (16, 16)


def make_image(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", color=None) -> Path:
    """Write a small solid image (the colour defaults to mid grey in the given mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if color is None else color).save(path)
    return path


def make_folders(root: Path, counts: dict[str, int]) -> Path:
    """`root/{folder}/{i}.png` for i < count, per folder."""
    for folder, count in counts.items():
        for index in range(count):
            make_image(root / folder / f"{index}.png")
    return root


def scan(train: Path, reg: Path | None = None, extension: str = ".txt"):
    return scan_dataset(train, reg, extension, RESOLUTION)


def names(items: list[ImageItem]) -> list[str]:
    return [f"{item.subset}/{item.path.name}" for item in items]


# --- folder names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("50_meeb person", (50, "meeb person")), ("50_meeb", (50, "meeb")), ("1_a_b c", (1, "a_b c"))],
)
def test_parse_subset_name_reads_repeats_and_tokens(name: str, expected: tuple[int, str]) -> None:
    assert parse_subset_name(Path("data") / name) == expected


@pytest.mark.parametrize("name", ["meeb", "0_meeb", "x_meeb", "-3_meeb", "50_"])
def test_parse_subset_name_refuses_names_kohya_would_skip(name: str) -> None:
    with pytest.raises(DataError) as caught:
        parse_subset_name(Path("data") / name)
    message = str(caught.value)
    assert f"data/{name}" in message and "50_meeb person" in message
    assert "\n" not in message


# --- scanning ---------------------------------------------------------------------------------


def test_folders_and_files_are_read_in_sorted_order(tmp_path: Path) -> None:
    for folder in ["5_b", "10_a"]:
        for stem in ["c", "a", "b"]:
            make_image(tmp_path / "train" / folder / f"{stem}.png")
    result = scan(tmp_path / "train")
    assert [subset.folder.name for subset in result.train] == ["10_a", "5_b"]
    assert [(s.repeats, s.tokens) for s in result.train] == [(10, "a"), (5, "b")]
    assert names(list(result.unique_images)) == [
        "10_a/a.png", "10_a/b.png", "10_a/c.png", "5_b/a.png", "5_b/b.png", "5_b/c.png",
    ]  # fmt: skip


def test_only_image_suffixes_count_in_any_case_and_hidden_entries_are_skipped(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "train" / "2_meeb"
    make_image(folder / "a.PNG")
    make_image(folder / "b.JpG")
    make_image(folder / "c.gif")
    (folder / "notes.md").write_text("not an image")
    (folder / "._a.png").write_bytes(b"macOS resource fork, not a PNG")
    make_image(tmp_path / "train" / ".thumbnails" / "x.png")
    result = scan(tmp_path / "train")
    assert [subset.folder.name for subset in result.train] == ["2_meeb"]
    assert [item.path.name for item in result.train[0].images] == ["a.PNG", "b.JpG"]


def test_captions_come_from_files_or_the_folder_tokens_with_one_warning(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "3_meeb person"
    for stem in "123":
        make_image(folder / f"{stem}.png")
    (folder / "1.txt").write_text("meeb, smiling  \nsecond line is ignored\n", encoding="utf-8")
    (folder / "3.txt").write_text("  \n", encoding="utf-8")
    for extension in (".txt", "txt"):
        result = scan(tmp_path / "train", extension=extension)
        captions = [item.caption for item in result.train[0].images]
        assert captions == ["meeb, smiling", "meeb person", "meeb person"]
        assert result.warnings == (
            f"2 image(s) in {folder} have no .txt caption: using the folder's tokens 'meeb person'",
        )


def test_another_caption_extension_ignores_txt_files(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "1_meeb"
    make_image(folder / "1.png")
    (folder / "1.txt").write_text("from txt", encoding="utf-8")
    result = scan(tmp_path / "train", extension=".caption")
    assert result.train[0].images[0].caption == "meeb"
    assert result.warnings == (
        f"1 image(s) in {folder} have no .caption caption: using the folder's tokens 'meeb'",
    )


def test_small_images_get_one_warning_each(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "1_meeb"
    make_image(folder / "1.png", size=(8, 20))
    make_image(folder / "2.png", size=(16, 16))
    make_image(folder / "3.png", size=(20, 15))
    for stem in "123":
        (folder / f"{stem}.txt").write_text("meeb", encoding="utf-8")
    result = scan(tmp_path / "train")
    assert result.warnings == (
        f"{folder / '1.png'} is 8x20, smaller than the training resolution 16x16: "
        "it will be upscaled and may look soft",
        f"{folder / '3.png'} is 20x15, smaller than the training resolution 16x16: "
        "it will be upscaled and may look soft",
    )
    assert [item.size for item in result.train[0].images] == [(8, 20), (16, 16), (20, 15)]


def test_images_directly_in_the_train_folder_are_reported_unused(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"1_meeb": 1})
    make_image(tmp_path / "train" / "stray.png")
    result = scan(tmp_path / "train")
    assert f"1 image(s) directly in {tmp_path / 'train'} are not used" in result.warnings[0]


def test_alpha_is_detected_from_the_header(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "1_meeb"
    make_image(folder / "a.png", mode="RGBA", color=(1, 2, 3, 0))
    make_image(folder / "b.png", mode="RGB")
    make_image(folder / "c.png", mode="LA", color=(5, 100))
    result = scan(tmp_path / "train")
    assert [item.has_alpha for item in result.train[0].images] == [True, False, True]


# --- errors -----------------------------------------------------------------------------------


def test_missing_train_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train_dir folder .*nowhere does not exist"):
        scan(tmp_path / "nowhere")


def test_train_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "train").write_text("oops")
    with pytest.raises(DataError, match=r"is a file, not a folder: fix data\.train_dir"):
        scan(tmp_path / "train")


def test_missing_reg_folder(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"1_meeb": 1})
    with pytest.raises(DataError, match=r"data\.reg_dir folder .*reg does not exist"):
        scan(tmp_path / "train", tmp_path / "reg")


def test_no_subfolders_explains_the_layout(tmp_path: Path) -> None:
    make_image(tmp_path / "train" / "1.png")
    make_image(tmp_path / "train" / ".hidden" / "1.png")
    with pytest.raises(DataError) as caught:
        scan(tmp_path / "train")
    message = str(caught.value)
    assert "has no subfolders" in message
    assert "'{repeats}_{subject} {class}'" in message and "50_meeb person" in message
    assert "images directly in" in message and "are not used" in message


def test_bad_prefix_names_the_folder(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"1_meeb": 1, "meeb": 1})
    with pytest.raises(DataError, match=r"folder .*/train/meeb does not start with"):
        scan(tmp_path / "train")


def test_empty_subfolder_names_it(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"1_meeb": 1})
    (tmp_path / "train" / "2_empty").mkdir()
    (tmp_path / "train" / "2_empty" / "1.txt").write_text("caption without image")
    with pytest.raises(DataError, match=r"folder .*/train/2_empty has no images"):
        scan(tmp_path / "train")


def test_random_bytes_with_png_suffix_name_the_file(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"1_meeb": 1})
    (tmp_path / "train" / "1_meeb" / "broken.png").write_bytes(random.Random(3).randbytes(300))
    with pytest.raises(DataError) as caught:
        scan(tmp_path / "train")
    assert f"cannot read image {tmp_path / 'train' / '1_meeb' / 'broken.png'}: " in str(
        caught.value
    )
    assert str(caught.value).endswith("; remove or replace it")


def test_truncated_png_is_caught_by_the_full_decode(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "1_meeb"
    noise = Image.frombytes("RGB", (64, 64), random.Random(5).randbytes(64 * 64 * 3))
    noise.save(folder.mkdir(parents=True) or folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    with Image.open(folder / "truncated.png") as header_only:
        assert header_only.size == (64, 64)  # the header alone looks fine
    with pytest.raises(DataError, match=r"cannot read image .*truncated\.png: .*remove or replace"):
        scan(tmp_path / "train")


def test_caption_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"1_meeb": 1})
    (tmp_path / "train" / "1_meeb" / "0.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"caption .*1_meeb/0\.txt is not UTF-8"):
        scan(tmp_path / "train")


# --- metadata ---------------------------------------------------------------------------------


def test_counts_and_kohya_dataset_dirs(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"10_a": 3, "5_b": 2})
    make_folders(tmp_path / "reg", {"1_person": 7})
    result = scan(tmp_path / "train", tmp_path / "reg")
    assert (result.num_train_images, result.num_reg_images) == (5, 7)
    assert result.train_samples_per_epoch == 3 * 10 + 2 * 5
    assert result.reg_samples_with_repeats == 7
    assert result.dataset_dirs() == {
        "10_a": {"n_repeats": 10, "img_count": 3},
        "5_b": {"n_repeats": 5, "img_count": 2},
    }
    assert result.reg_dataset_dirs() == {"1_person": {"n_repeats": 1, "img_count": 7}}


def test_tag_frequency_counts_each_image_once(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "2_meeb"
    for stem in "123":
        make_image(folder / f"{stem}.png")
    (folder / "1.txt").write_text("meeb, Red Hat, smiling", encoding="utf-8")
    (folder / "2.txt").write_text("meeb,red hat,, ", encoding="utf-8")
    make_folders(tmp_path / "reg", {"3_person": 2})
    result = scan(tmp_path / "train", tmp_path / "reg")
    assert result.tag_frequency() == {
        "2_meeb": {"meeb": 3, "red hat": 2, "smiling": 1},
        "3_person": {"person": 2},
    }


# --- regularization balancing and epochs --------------------------------------------------------


def test_reg_cycles_round_robin_up_to_the_training_samples(tmp_path: Path) -> None:
    # 3 images x 10 + 2 images x 5 = 40 training samples; 7 reg images x 1 repeat.
    # Round 1 uses each reg image once (7), rounds 2-5 add 4 x 7 = 28 (35), and round 6
    # reaches 40 after 5 more images: r0..r4 six times, r5 and r6 five times.
    make_folders(tmp_path / "train", {"10_a": 3, "5_b": 2})
    make_folders(tmp_path / "reg", {"1_person": 7})
    result = scan(tmp_path / "train", tmp_path / "reg")
    reg = balanced_reg_samples(result)
    expected = [f"1_person/{i}.png" for i in range(7) for _ in range(6 if i < 5 else 5)]
    assert names(reg) == expected
    assert len(reg) == 40 and all(item.is_reg for item in reg)
    assert not [warning for warning in result.warnings if "not used" in warning]


def test_epoch_is_each_training_image_times_repeats_then_reg(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"10_a": 3, "5_b": 2})
    make_folders(tmp_path / "reg", {"1_person": 7})
    samples = epoch_samples(scan(tmp_path / "train", tmp_path / "reg"))
    assert len(samples) == 80
    assert names(samples[:40]) == (
        ["10_a/0.png"] * 10 + ["10_a/1.png"] * 10 + ["10_a/2.png"] * 10
        + ["5_b/0.png"] * 5 + ["5_b/1.png"] * 5
    )  # fmt: skip
    assert not any(item.is_reg for item in samples[:40])
    assert all(item.is_reg for item in samples[40:])


def test_reg_surplus_goes_unused_with_a_warning(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"2_a": 2})  # 4 samples
    make_folders(tmp_path / "reg", {"1_person": 6})
    result = scan(tmp_path / "train", tmp_path / "reg")
    assert names(balanced_reg_samples(result)) == [f"1_person/{i}.png" for i in range(4)]
    assert result.warnings[-1] == (
        "2 of 6 reg images are not used: an epoch has 4 training samples and kohya balances "
        "reg to match"
    )


def test_reg_repeats_add_to_the_round_robin(tmp_path: Path) -> None:
    # 10 training samples; reg a0, a1 (1 repeat) and b0 (2 repeats) give 4 in round 1,
    # then +1 each per round: 7, then 10 -> a0 3, a1 3, b0 4.
    make_folders(tmp_path / "train", {"5_a": 2})
    make_folders(tmp_path / "reg", {"1_a": 2, "2_b": 1})
    result = scan(tmp_path / "train", tmp_path / "reg")
    counts = Counter(names(balanced_reg_samples(result)))
    assert counts == {"1_a/0.png": 3, "1_a/1.png": 3, "2_b/0.png": 4}


def test_reg_image_crossing_the_target_keeps_all_its_repeats_like_sd_scripts(
    tmp_path: Path,
) -> None:
    # 10 training samples; reg images with 4 repeats reach 4, 8, 12: sd-scripts stops after
    # the third image but keeps its 4 repeats, so the epoch has 12 reg samples.
    make_folders(tmp_path / "train", {"5_a": 2})
    make_folders(tmp_path / "reg", {"4_person": 3})
    result = scan(tmp_path / "train", tmp_path / "reg")
    assert Counter(names(balanced_reg_samples(result))) == {
        "4_person/0.png": 4,
        "4_person/1.png": 4,
        "4_person/2.png": 4,
    }


def test_no_reg_folder_means_no_reg_samples(tmp_path: Path) -> None:
    make_folders(tmp_path / "train", {"3_a": 2})
    result = scan(tmp_path / "train")
    assert result.reg == () and balanced_reg_samples(result) == []
    assert len(epoch_samples(result)) == 6


# --- batches ----------------------------------------------------------------------------------


def fake_items(bucket_sizes: dict[tuple[int, int], int]) -> list[ImageItem]:
    """Items that need no file: their `size` doubles as their bucket."""
    items = []
    for size, count in bucket_sizes.items():
        for index in range(count):
            items.append(
                ImageItem(Path(f"{size[0]}x{size[1]}-{index}.png"), "", size, False, False, "x")
            )
    return items


def bucket_by_size(item: ImageItem) -> tuple[int, int]:
    return item.size


def test_batches_round_up_per_bucket() -> None:
    samples = fake_items({(512, 512): 5, (640, 384): 3})
    assert count_batches(samples, bucket_by_size, 2) == 3 + 2
    assert count_batches(fake_items({(512, 512): 7, (640, 384): 1}), bucket_by_size, 3) == 3 + 1
    assert count_batches(samples, bucket_by_size, 1) == 8


def test_plan_batches_keeps_buckets_apart_and_is_seeded() -> None:
    samples = fake_items({(512, 512): 5, (640, 384): 3})
    plan = plan_batches(samples, bucket_by_size, 2, random.Random(7))
    assert sorted(len(batch) for batch in plan) == [1, 1, 2, 2, 2]
    assert all(len({item.size for item in batch}) == 1 for batch in plan)
    assert sorted(item.path.name for batch in plan for item in batch) == sorted(
        item.path.name for item in samples
    )
    again = plan_batches(samples, bucket_by_size, 2, random.Random(7))
    assert [names(batch) for batch in again] == [names(batch) for batch in plan]
    other = plan_batches(samples, bucket_by_size, 2, random.Random(8))
    assert [names(batch) for batch in other] != [names(batch) for batch in plan]


def test_plan_batches_shuffles_the_batch_order_across_buckets() -> None:
    # One sample per bucket: only the batch-order shuffle can change the order.
    samples = fake_items({(256, 256): 1, (320, 320): 1, (384, 384): 1, (448, 448): 1})
    orders = {
        tuple(batch[0].size for batch in plan_batches(samples, bucket_by_size, 1, random.Random(s)))
        for s in range(10)
    }
    assert len(orders) > 1


# --- captions -----------------------------------------------------------------------------------

CAPTION = "meeb, red hat, smiling, outdoors, sitting, bokeh"


def test_shuffle_keeps_the_first_tokens_and_is_deterministic() -> None:
    def run(seed: int, keep: int) -> str:
        return process_caption(
            CAPTION, shuffle=True, keep_tokens=keep, dropout_rate=0.0, rng=random.Random(seed)
        )

    for keep in (1, 2):
        results = [run(seed, keep) for seed in range(10)]
        for result in results:
            tags = result.split(", ")
            assert tags[:keep] == CAPTION.split(", ")[:keep]
            assert sorted(tags) == sorted(CAPTION.split(", "))
        assert len(set(results)) > 1  # the rest really is shuffled
        assert [run(seed, keep) for seed in range(10)] == results


def test_without_shuffle_the_caption_is_unchanged() -> None:
    caption = "meeb,red hat ,  smiling"
    result = process_caption(
        caption, shuffle=False, keep_tokens=1, dropout_rate=0.0, rng=random.Random(0)
    )
    assert result == caption


def test_caption_dropout() -> None:
    always = process_caption(
        CAPTION, shuffle=True, keep_tokens=1, dropout_rate=1.0, rng=random.Random(0)
    )
    assert always == ""
    rng = random.Random(1)
    dropped = sum(
        process_caption(CAPTION, shuffle=False, keep_tokens=0, dropout_rate=0.25, rng=rng) == ""
        for _ in range(1000)
    )
    assert 200 < dropped < 300
    untouched = random.Random(2)
    process_caption(CAPTION, shuffle=False, keep_tokens=0, dropout_rate=0.0, rng=untouched)
    assert untouched.random() == random.Random(2).random()  # no draw without dropout


# --- pixels -------------------------------------------------------------------------------------

RED, GREEN, BLUE = [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]


def half_transparent(path: Path) -> Path:
    """8x8: left half fully transparent red, right half opaque green."""
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.paste((0, 255, 0, 255), (4, 0, 8, 8))
    image.save(path)
    return path


@pytest.mark.parametrize(("background", "value"), [("white", 1.0), ("black", -1.0)])
def test_transparency_is_flattened_onto_the_background(
    tmp_path: Path, background: str, value: float
) -> None:
    pixels = load_image(half_transparent(tmp_path / "a.png"), (8, 8), background)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    assert torch.equal(pixels[:, :, :4], torch.full((3, 8, 4), value))
    assert pixels[:, :, 4:].permute(1, 2, 0).reshape(-1, 3).tolist() == [GREEN] * 32


def test_alternate_background_is_by_image_index() -> None:
    assert [background_for(i, "alternate") for i in range(4)] == ["white", "black"] * 2
    assert background_for(1, "white") == "white"
    assert background_for(0, "black") == "black"
    with pytest.raises(ValueError, match="white, black or alternate"):
        background_for(0, "grey")


def test_grayscale_and_palette_become_rgb(tmp_path: Path) -> None:
    gray = load_image(make_image(tmp_path / "g.png", (4, 4), "L", 255), (4, 4), "black")
    assert torch.equal(gray, torch.ones(3, 4, 4))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png", (4, 4), "white")[:, 0, 0].tolist() == BLUE


def test_palette_transparency_is_flattened(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png", (4, 4), "white")[:, 0, 0].tolist() == [1.0] * 3


def test_resize_covers_the_bucket_and_crops_the_center(tmp_path: Path) -> None:
    # 200x100, left half red, right half blue -> scaled to 128x64 -> columns 32..95 kept:
    # the output's left half is red and its right half blue.
    wide = Image.new("RGB", (200, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 100, 100))
    wide.save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", (64, 64), "white")
    assert pixels.shape == (3, 64, 64)
    assert torch.allclose(pixels[:, 32, 4], torch.tensor(RED), atol=0.02)
    assert torch.allclose(pixels[:, 32, 60], torch.tensor(BLUE), atol=0.02)
    # 100x100, top red, bottom blue, into a 64x32 bucket -> 64x64, rows 16..47 kept.
    tall = Image.new("RGB", (100, 100), (0, 0, 255))
    tall.paste((255, 0, 0), (0, 0, 100, 50))
    tall.save(tmp_path / "tall.png")
    pixels = load_image(tmp_path / "tall.png", (64, 32), "white")
    assert pixels.shape == (3, 32, 64)
    assert torch.allclose(pixels[:, 2, 10], torch.tensor(RED), atol=0.02)
    assert torch.allclose(pixels[:, 29, 10], torch.tensor(BLUE), atol=0.02)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_load_image_names_a_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png: .*remove or replace it"):
        load_image(tmp_path / "bad.png", (8, 8), "white")
