"""A network as after training, for tests that need real network files without training.

LyCORIS initialises one factor of most modules to zero (LoHA's w2_a, LoRA's up), so a
fresh network changes nothing; here every parameter is drawn instead.
"""

from __future__ import annotations

import torch

from meebs.models.base import BaseModel
from meebs.models.builtin_models import build_tiny
from meebs.network.build import LycorisNetworkKohya, NetworkSpec, build_network


def random_network(
    spec: NetworkSpec, model: BaseModel | None = None, *, seed: int = 1, std: float = 0.3
) -> LycorisNetworkKohya:
    """`spec` on `model` (default: the tiny base), every parameter ~ N(0, std) from `seed`;
    applied to the model: call `.restore()` when the model is used again."""
    model = model or build_tiny()
    torch.manual_seed(seed)
    network = build_network(model.unet, model.text_encoder, spec)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, std)
    return network
