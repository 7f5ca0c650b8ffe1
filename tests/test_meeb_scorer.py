"""The committed meeb scorer, on drawings it never saw: at least 98% right, clean and
through the tiny-trained VAE, both the colour and the shape variant."""

from __future__ import annotations

import pytest
import torch

from meebs.models.loading import load_base_model
from meebs.tiny.meeb_scorer import MeebScorer, evaluate_scorers, vae_round_trip
from meebs.tiny.pretrain_data import VAE_KINDS, draw_many, to_tensor
from meebs.tiny.verdict import load_scorers

HELD_OUT_SEED = 424242  # neither the scorer's training pool nor pretrain's evaluation


@pytest.mark.slow
def test_held_out_accuracy_is_at_least_98_percent():
    scorers = load_scorers()
    vae = load_base_model(builtin="tiny-trained", path=None, sha256=None, allow_pickle=False).vae
    accuracy = evaluate_scorers(scorers, vae, HELD_OUT_SEED, torch.device("cpu"), per_kind=60)
    print(accuracy)
    assert set(accuracy) == {
        f"scorer_{name}_accuracy_{variant}"
        for name in ("colour", "shape")
        for variant in ("clean", "vae")
    }
    assert min(accuracy.values()) >= 0.98, accuracy


def test_shape_variant_does_not_see_colour():
    """A colour shift that keeps every pixel's luminance moves the colour scorer's logits
    and leaves the shape scorer's as they were."""
    scorers = load_scorers()
    meebs = to_tensor(draw_many(5, ("meeb",), 16, 64))
    hue = torch.tensor([0.587, -0.299, 0.0]).view(1, 3, 1, 1)  # luminance weight 0
    shifted = meebs + 0.3 * hue
    assert torch.allclose(scorers["shape"](shifted), scorers["shape"](meebs), atol=1e-4)
    assert not torch.allclose(scorers["colour"](shifted), scorers["colour"](meebs), atol=1e-2)
    assert scorers["shape"].classify(meebs).count("meeb") >= 15


def test_round_trip_and_save_load(tmp_path):
    vae = load_base_model(builtin="tiny-trained", path=None, sha256=None, allow_pickle=False).vae
    images = to_tensor(draw_many(9, VAE_KINDS, 4, 64))
    out = vae_round_trip(vae, images, torch.device("cpu"))
    assert out.shape == images.shape
    scorer = load_scorers()["colour"]
    scorer.save(tmp_path / "s.safetensors")
    again = MeebScorer.load(tmp_path / "s.safetensors")
    assert torch.equal(again(images), scorer(images))
