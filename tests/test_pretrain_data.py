"""The pretraining pictures: seeded, the right kinds for each user, never a meeb for the UNet."""

from __future__ import annotations

import numpy as np
import pytest

from meebs.models.tokenizer import clip_tokenizer
from meebs.tiny.class_looks import CREATURES, SHAPES, draw_creature, draw_shape
from meebs.tiny.pretrain_data import (
    CLASS_KINDS,
    SCORER_LABELS,
    VAE_KINDS,
    draw_many,
    scorer_label,
    to_tensor,
)


def test_same_seed_same_pixels_and_captions():
    first, second = draw_many(3, VAE_KINDS, 12, 64), draw_many(3, VAE_KINDS, 12, 64)
    assert [d.caption for d in first] == [d.caption for d in second]
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        for a, b in zip(first, second, strict=True)
    )
    other = draw_many(4, VAE_KINDS, 12, 64)
    assert [d.caption for d in other] != [d.caption for d in first]


def test_class_data_never_holds_a_meeb():
    drawings = draw_many(0, CLASS_KINDS, 300, 64)
    assert {d.kind for d in drawings} == set(CLASS_KINDS)
    assert not any("meeb" in d.caption for d in drawings)


def test_made_up_words_are_not_pieces_of_meeb():
    tokenizer = clip_tokenizer()
    meeb = set(tokenizer.tokenize("meeb"))
    for word in CREATURES:
        assert not set(tokenizer.tokenize(word)) & meeb, word


def test_every_look_draws_on_a_flat_background():
    for shape in SHAPES:
        image = draw_shape(shape, (200, 60, 50), 50, 50, 20, 15, 64)
        assert image.mode == "RGBA" and image.getchannel("A").getextrema() == (0, 255)
    for word in CREATURES:
        image = draw_creature(word, (70, 110, 215), 50, 55, 1.0, False, 64)
        assert image.getchannel("A").getextrema() == (0, 255)
    tensor = to_tensor(draw_many(1, VAE_KINDS, 8, 64))
    assert tensor.shape == (8, 3, 64, 64) and tensor.min() >= -1 and tensor.max() <= 1
    corners = tensor[:, :, 0, 0]  # every picture sits on plain white or black
    assert all(bool((c == 1).all() or (c == -1).all()) for c in corners)


def test_scorer_labels():
    assert [scorer_label(kind) for kind in VAE_KINDS] == [
        SCORER_LABELS.index(label) for label in ("person", "other", "other", "meeb")
    ]


def test_unknown_looks_are_refused():
    with pytest.raises(ValueError, match="hexagon"):
        draw_shape("hexagon", (0, 0, 0), 50, 50, 10, 0, 64)
    with pytest.raises(ValueError, match="meeb"):
        draw_creature("meeb", (0, 0, 0), 50, 50, 1, False, 64)
