"""Aspect-ratio buckets, the way kohya sd-scripts makes and picks them.

Training on one square size crops portraits and landscapes badly. kohya instead trains each
image at a "bucket": a (width, height) pair of about the same area as the training
resolution whose aspect ratio is closest to the image's. We make the same bucket list and
pick the same bucket as sd-scripts so that a recipe gives the same batches here and there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from meebs.errors import RecipeError

Size = tuple[int, int]
"""A (width, height) pair in pixels."""


def make_buckets(max_reso: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """All buckets for a training resolution, sorted; sd-scripts' `make_bucket_resolutions`.

    For every width from `min_size` to `max_size` in `step`s the bucket takes the largest
    height (a multiple of `step`, at most `max_size`) whose area stays within
    `max_reso`'s area, and its transpose; the largest square that fits is added too.
    sd-scripts rounds a min or max size that is not a multiple of `step` (with a log line
    that is easy to miss); we refuse it and name the recipe key instead.
    """
    for key, value in (("min_bucket_reso", min_size), ("max_bucket_reso", max_size)):
        if value % step:
            raise RecipeError(
                f"data.{key} {value} is not a multiple of data.bucket_reso_steps {step}: "
                f"use {value - value % step} or {value - value % step + step}"
            )
    max_area = max_reso[0] * max_reso[1]
    square = int(math.sqrt(max_area) // step) * step
    buckets = {(square, square)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: Iterable[Size]) -> Size:
    """The bucket an image of `size` trains at: its own size if that is a bucket, else the
    bucket with the closest aspect ratio (the first in sorted order on a tie), like kohya."""
    ordered = sorted(buckets)
    if not ordered:
        raise ValueError("nearest_bucket needs at least one bucket")
    if size in ordered:
        return size
    aspect = size[0] / size[1]
    return min(ordered, key=lambda bucket: abs(bucket[0] / bucket[1] - aspect))


def bucket_for(
    size: Size, *, enable_bucket: bool, resolution: Size, buckets: Iterable[Size]
) -> Size:
    """The training size of an image: its nearest bucket, or `resolution` without bucketing."""
    if not enable_bucket:
        return resolution
    return nearest_bucket(size, buckets)
