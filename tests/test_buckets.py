"""Aspect-ratio buckets: the list sd-scripts makes and the bucket it picks per image."""

from __future__ import annotations

import pytest

from meebs.data.buckets import bucket_for, make_buckets, nearest_bucket
from meebs.errors import RecipeError

# Worked by hand from sd-scripts' rule: area 512*512 = 262144; for each width w in
# 256..1024 the height is min(1024, (262144 // w) // 64 * 64), kept when >= 256, plus the
# transpose; e.g. w=320 -> 819 // 64 * 64 = 768, w=704 -> 372 -> 320, w=832 -> 315 -> 256.
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024),
    (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320),
    (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_sd15_buckets_match_the_hand_computed_list() -> None:
    assert make_buckets((512, 512), 256, 1024, 64) == SD15_BUCKETS


def test_every_bucket_is_within_area_and_on_the_step() -> None:
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (640, 384) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= width <= 1024 and 256 <= height <= 1024
        assert width * height <= 512 * 512


def test_non_square_resolution_adds_the_largest_square_that_fits() -> None:
    # 768x512 = 393216 pixels; sqrt = 627.07 -> 9 steps of 64 = 576.
    buckets = make_buckets((768, 512), 256, 1024, 64)
    assert (576, 576) in buckets
    assert (768, 512) in buckets and (512, 768) in buckets
    assert (640, 640) not in buckets


def test_sizes_off_the_step_name_the_recipe_key() -> None:
    with pytest.raises(RecipeError, match=r"data\.min_bucket_reso 300 .* use 256 or 320"):
        make_buckets((512, 512), 300, 1024, 64)
    with pytest.raises(RecipeError, match=r"data\.max_bucket_reso 1000 .* use 960 or 1024"):
        make_buckets((512, 512), 256, 1000, 64)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 600), (640, 384)),  # 5:3 exactly
        ((600, 1000), (384, 640)),
        ((800, 800), (512, 512)),
        ((2000, 500), (1024, 256)),  # 4:1 exactly
        ((700, 600), (576, 448)),  # 1.167: 576/448 = 1.286 beats 512/512 = 1.0
    ],
)
def test_nearest_bucket_picks_the_closest_aspect_ratio(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert nearest_bucket(size, SD15_BUCKETS) == expected


def test_nearest_bucket_prefers_the_exact_size_then_the_first_sorted_on_ties() -> None:
    squares = [(512, 512), (256, 256)]  # deliberately unsorted
    assert nearest_bucket((512, 512), squares) == (512, 512)
    assert nearest_bucket((300, 300), squares) == (256, 256)


def test_bucket_for_uses_the_resolution_without_bucketing() -> None:
    assert bucket_for((1000, 600), enable_bucket=False, resolution=(512, 512), buckets=[]) == (
        512,
        512,
    )
    assert bucket_for(
        (1000, 600), enable_bucket=True, resolution=(512, 512), buckets=SD15_BUCKETS
    ) == (640, 384)
