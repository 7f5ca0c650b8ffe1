"""One epoch's samples in batches, as kohya sd-scripts makes them (a batch never mixes
buckets), and the caption each sample trains with.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from meebs.data.folders import ImageItem, split_tags


def plan_batches(
    samples: list[ImageItem],
    bucket_of: Callable[[ImageItem], tuple[int, int]],
    batch_size: int,
    rng: random.Random,
) -> list[list[ImageItem]]:
    """Batches for one epoch: samples of one bucket per batch, shuffled with `rng`.

    Like kohya, a batch never mixes buckets (tensors must share a size), so each bucket's
    last batch may be short; the batch order is shuffled across buckets afterwards.
    """
    batches: list[list[ImageItem]] = []
    for members in _group_by_bucket(samples, bucket_of):
        rng.shuffle(members)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def count_batches(
    samples: list[ImageItem],
    bucket_of: Callable[[ImageItem], tuple[int, int]],
    batch_size: int,
) -> int:
    """Batches per epoch without building them: the sum over buckets of ceil(count/batch)."""
    groups = _group_by_bucket(samples, bucket_of)
    return sum(math.ceil(len(members) / batch_size) for members in groups)


def _group_by_bucket(
    samples: list[ImageItem], bucket_of: Callable[[ImageItem], tuple[int, int]]
) -> list[list[ImageItem]]:
    """Samples per bucket, buckets in sorted order, samples in their given order."""
    groups: dict[tuple[int, int], list[ImageItem]] = {}
    for sample in samples:
        groups.setdefault(bucket_of(sample), []).append(sample)
    return [groups[bucket] for bucket in sorted(groups)]


def process_caption(
    caption: str, *, shuffle: bool, keep_tokens: int, dropout_rate: float, rng: random.Random
) -> str:
    """The caption one sample trains with, following kohya's caption options.

    With probability `dropout_rate` it is "" (trains the unconditional prompt). With
    `shuffle`, the tags after the first `keep_tokens` are shuffled and everything is joined
    with ", "; without it the caption is used unchanged. Empty tags are dropped when
    shuffling (kohya keeps them, producing ", ," in the prompt).
    """
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)
