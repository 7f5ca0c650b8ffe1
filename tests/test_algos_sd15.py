"""Every LyCORIS algorithm trains on the real SD 1.5 architecture's layers (issue 21).

tests/test_algos.py trains each algorithm through the trainer on the tiny base (the same
module classes, hooks and trainer) and places its keys on SD 1.5's layers without weights
(meta device). What the tiny base cannot show is SD 1.5's sizes: a LoKr factor of 1920
channels, a Diag-OFT block of 1280, a DoRA norm over 3x3x640. So here each algorithm is
built on the full-size architecture (random weights), and every module of each distinct
layer shape (and kind) takes a real optimizer step through its own forward: loss and
gradients finite, a gradient reaches the module, the step changes it. Then the whole
network is saved and every module of the file rebuilds its layer's shape.

One full forward of the model per algorithm would show the same for ~20 s each on two
cores (lycoris' own forward rebuilds all ~1B weights per step); one module per shape
takes well under a second.
"""

from __future__ import annotations

import pytest
import torch

from meebs.models.builtin_models import build_sd15_random
from meebs.network.algo_tensors import misfit, modules_of
from meebs.network.build import NetworkSpec, build_network
from meebs.network.network_file import load_network_tensors
from meebs.network.save import save_network

pytestmark = pytest.mark.slow  # the full-size model: ~6 s to build

SPECS = {
    "lokr": NetworkSpec(algo="lokr", factor=8),
    "lokr-default": NetworkSpec(algo="lokr"),
    "glora": NetworkSpec(algo="glora"),
    "diag-oft": NetworkSpec(algo="diag-oft", constraint=1e-4, rescaled=True),
    "full": NetworkSpec(algo="full"),
    "ia3": NetworkSpec(algo="ia3"),
    "locon-dora": NetworkSpec(algo="locon", dora_wd=True),
    "loha-dora": NetworkSpec(algo="loha", dora_wd=True, use_tucker=True),
}


@pytest.fixture(scope="module")
def sd15():
    model = build_sd15_random()
    for part in (model.unet, model.text_encoder):
        part.requires_grad_(False)
    return model


def one_per_shape(network) -> list:
    """The first module of each (layer class, weight shape) of the network."""
    seen = {}
    for lora in network.loras:
        seen.setdefault((type(lora.org_module[0]).__name__, tuple(lora.shape)), lora)
    return list(seen.values())


def layer_input(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(1, layer.in_channels, 4, 4)
    return torch.randn(2, 3, layer.in_features)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_sd15_layer_shape_takes_a_step(name, sd15, tmp_path):
    torch.manual_seed(0)
    network = build_network(sd15.unet, sd15.text_encoder, SPECS[name])
    try:
        modules = one_per_shape(network)
        assert len(modules) >= 10  # SD 1.5's Linear and conv shapes ((IA)^3: 11, LoKr: 35)
        for lora in modules:
            params = [p for p in lora.parameters() if p.requires_grad]
            before = [p.detach().clone() for p in params]
            out = lora(layer_input(lora.org_module[0]))
            loss = (out - 1).square().mean()
            loss.backward()
            assert torch.isfinite(loss), lora.lora_name
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
            assert any(p.grad is not None and p.grad.any() for p in params), lora.lora_name
            torch.optim.AdamW(params, lr=1e-3).step()
            changed = (not torch.equal(p, b) for p, b in zip(params, before, strict=True))
            assert any(changed), lora.lora_name
        if name == "full":
            return  # its file is the ~1B weights (30 s to write); test_algos saves it on tiny
        file = tmp_path / f"{name}.safetensors"
        save_network(network, file, {}, torch.float32)
        layers = {lora.lora_name: tuple(lora.shape) for lora in network.loras}
    finally:
        network.restore()
    shapes = {key: tuple(t.shape) for key, t in load_network_tensors(file).items()}
    saved = modules_of(shapes)
    assert saved.keys() == layers.keys()
    assert not {m: misfit(m, f, layers[m]) for m, f in saved.items() if misfit(m, f, layers[m])}
