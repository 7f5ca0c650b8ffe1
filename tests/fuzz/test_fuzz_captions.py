"""Fuzzing caption reading (issue 19): the `.txt` next to each training image, the
`{repeats}_{tokens}` folder name whose tokens caption the images without one, and what
training makes of a caption (kohya's tag shuffling, keep_tokens and dropout).

Property (fuzz/one_line.py): any caption file, folder name and caption extension that
the recipe accepts gives a dataset scan or a `MeebsError` of one line, never another
exception and never a hang. A scan is usable: every caption is one stripped line, the
tag counts and the caption each sample trains with can be computed.

Bound: a caption file of at most 64 KiB is read within 5 s (every example's deadline; the
worst cases below, measured) and with at most 64 MiB of Python allocations at peak.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from PIL import Image

from fuzz.one_line import result_or_one_line
from fuzz.test_fuzz_recipe import (
    BOUND_BYTES,
    BOUND_SECONDS,
    INPUT_BYTES,
    WEIRD_STRINGS,
    measured,
    scratch,
)
from meebs.data.batches import process_caption
from meebs.data.folders import DatasetScan, scan_dataset, split_tags
from meebs.errors import MeebsError
from meebs.recipe.loading import recipe_from_dict


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
RECIPE = {"model": {"builtin": "tiny"}, "data": {"train_dir": "d"}, "output": {"name": "x"}}


def extension_accepted(extension: str) -> bool:
    """Whether a recipe accepts `data.caption_extension: extension` (scan_dataset only
    ever sees those)."""
    raw = RECIPE | {"data": {"train_dir": "d", "caption_extension": extension}}
    return not isinstance(result_or_one_line(recipe_from_dict, raw, where="r.yaml"), MeebsError)


def check_scan(
    caption: bytes | None,
    folder_name: str = "10_meeb person",
    extension: str = ".txt",
    stem: str = "img",
):
    """One training folder with one image `{stem}.png` and its `caption` (None: none)."""
    with scratch() as tmp:
        train = Path(tmp) / "train"
        suffix = extension if extension.startswith(".") else f".{extension}"
        try:
            (train / folder_name).mkdir(parents=True)
            (train / folder_name / f"{stem}.png").write_bytes(PNG)
        except (OSError, ValueError):  # a name no filesystem takes: no dataset has it
            assume(False)
        written = None
        if caption is not None:
            with contextlib.suppress(OSError, ValueError):  # ".t/x": a caption nobody can write
                (train / folder_name / f"{stem}{suffix}").write_bytes(caption)
                written = caption
        result = result_or_one_line(scan_dataset, train, None, extension, (64, 64))
    if isinstance(result, DatasetScan):
        check_usable(result)
        expected = _first_line(written)
        if expected:  # the caption next to the image is the one it trains with
            assert result.unique_images[0].caption == expected
    return result


def _first_line(caption: bytes | None) -> str:
    try:
        lines = (caption or b"").decode("utf-8-sig").strip().splitlines()
    except UnicodeDecodeError:
        return ""
    return lines[0].strip() if lines else ""


def check_usable(scan: DatasetScan) -> None:
    """A caption from a file is its first line, stripped; without one, the folder's
    tokens (kohya's rule: whatever the folder name holds)."""
    rng = random.Random(0)
    for subset in scan.train:
        for image in subset.images:
            assert image.caption and image.caption == image.caption.strip()
            if image.caption != subset.tokens:
                assert len(image.caption.splitlines()) == 1, image.caption
            for tag in split_tags(image.caption):
                assert tag and "," not in tag
            for keep in (0, 1, 3):
                process_caption(
                    image.caption, shuffle=True, keep_tokens=keep, dropout_rate=0.5, rng=rng
                )
    scan.tag_frequency()


# --------------------------------------------------------------------------- caption files


@given(st.binary(max_size=2000))
# edge cases that never failed, kept because a change to read_text could break them:
@example(b"")
@example(b"\xef\xbb\xbf")  # a byte-order mark and nothing else
@example(b"\xef\xbb\xbf\xff")  # not UTF-8 after the mark: the offset counts the mark
@example(b"\xef\xbb")  # half a mark
@example(b"\xff\xfem\x00e\x00")  # UTF-16, as an old Windows tool saves it
@example(b"\n\n  \n")
@example(b"a\x85b")  # NEL: a line break to str.splitlines
@example(b"a\xe2\x80\xa8b")  # U+2028 LINE SEPARATOR, ditto
def test_caption_bytes(data):
    check_scan(data)


@given(st.text(max_size=500))
def test_caption_text(text):
    check_scan(text.encode("utf-8"))


@given(st.lists(st.text(max_size=12) | st.sampled_from(WEIRD_STRINGS), max_size=8))
def test_captions_of_tags(tags):
    check_scan(", ".join(tags).encode("utf-8"))


# --------------------------------------------------------------- folder names, extensions


folder_names = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda repeats, tokens: f"{repeats}_{tokens}",
        st.integers(min_value=-5, max_value=10**6) | st.sampled_from(["", "０", "١", "1e3", " 1"]),
        st.text(max_size=20) | st.sampled_from(WEIRD_STRINGS),
    ),
)


@given(folder_names, st.none() | st.binary(max_size=100), st.text(max_size=12))
@example("1_\n", None, "img")  # the folder name's newline broke the message
@example("10_meeb", b"\xff", "a\nb")  # ... and the caption's name
@example("10_a\nb", None, "img")  # kohya's rule: a caption from the tokens keeps the newline
@example("99999999999999999999_x", b"x", "img")
@example("10_ ", b"", "img")
def test_folder_and_file_names(name, caption, stem):
    check_scan(caption, folder_name=name, stem=stem)


extensions = st.one_of(
    st.sampled_from([".txt", "txt", ".caption", "..txt", ".TXT", ".tags.txt", ".", "", ".t/x"]),
    st.text(max_size=8),
    st.text(max_size=8).map(lambda text: f".{text}"),
)


@given(extensions, st.binary(max_size=100))
@example(".t/x", b"meeb")  # accepted by the recipe, then Path.with_suffix raised ValueError
@example(".t\x00x", b"meeb")  # never crashed: no file has that name, all captions missing
def test_caption_extensions(extension, caption):
    if extension_accepted(extension):
        check_scan(caption, extension=extension)


# --------------------------------------------------------------------------- the bound


WORST_CASES = {
    "one long line": b"a" * INPUT_BYTES,
    "many tags": b"a," * (INPUT_BYTES // 2),
    "many empty tags": b"," * INPUT_BYTES,
    "many lines": b"a\n" * (INPUT_BYTES // 2),
    "many line separators": "a\u2028".encode() * (INPUT_BYTES // 4),
    "not UTF-8 at the end": b"a" * INPUT_BYTES + b"\xff",
    "spaces": b" " * INPUT_BYTES,
}


@pytest.mark.parametrize("case", sorted(WORST_CASES))
def test_worst_cases_stay_within_the_bound(case):
    result, seconds, peak = measured(lambda: check_scan(WORST_CASES[case]))
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f} s"
    assert peak < BOUND_BYTES, f"{case}: {peak / 2**20:.0f} MiB"
    assert isinstance(result, (DatasetScan, MeebsError))
