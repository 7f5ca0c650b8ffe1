"""LoHA, LoCon and LoRA files on the real SD 1.5 architecture: every key has a home.

AUTOMATIC1111 and ComfyUI drop keys they cannot place with at most a warning, so each
saved key is mapped by their rules (tests/sd15_naming.py) onto the reference layer list,
and by our merge's own mapping (`meebs.network.kohya_names`) onto a layer whose weight the
rebuilt delta fits exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sd15_naming import a1111_target, comfyui_accepts_text_encoder_key

from meebs.network.build import NetworkSpec, build_network
from meebs.network.deltas import module_delta
from meebs.network.kohya_names import kohya_layers
from meebs.network.save import save_network
from meebs.use.merge import read_network

pytestmark = pytest.mark.slow

REFERENCE = Path(__file__).parent / "reference_sd15"
SPECS = {
    "loha": NetworkSpec(algo="loha", dim=4, alpha=1.0, conv_dim=4, conv_alpha=1.0),
    "locon": NetworkSpec(algo="locon", dim=4, alpha=1.0, conv_dim=4, conv_alpha=1.0),
    "lora": NetworkSpec(algo="lora", dim=4, alpha=1.0, conv_dim=0),
}


def reference_layers() -> dict[str, tuple[int, ...]]:
    """Flattened LDM / CLIP layer name -> weight shape, as the loaders see SD 1.5."""
    layers = {}
    for name in ("sd15_ldm_unet_weights.txt", "sd15_text_encoder_linear_weights.txt"):
        for line in (REFERENCE / name).read_text().splitlines():
            if line and not line.startswith("#"):
                layer, shape = line.split()
                layers[layer.replace(".", "_")] = tuple(int(size) for size in shape.split("x"))
    return layers


@pytest.mark.parametrize("algo", SPECS)
def test_every_key_lands_in_both_loaders_and_in_merge(algo, sd15_random_parts, tmp_path):
    unet, text_encoder = sd15_random_parts
    torch.manual_seed(0)
    network = build_network(unet, text_encoder, SPECS[algo])
    file = tmp_path / f"{algo}.safetensors"
    try:
        save_network(network, file, {}, torch.float16)
    finally:
        network.restore()  # the parts are shared by the whole session
    modules = read_network(file)
    reference, layers = reference_layers(), kohya_layers(unet, text_encoder)
    problems = []
    for module, tensors in sorted(modules.items()):
        target = a1111_target(module)
        if target not in reference:
            problems.append(f"{module}: AUTOMATIC1111 places it on {target}, no such layer")
            continue
        if module.startswith("lora_te") and not comfyui_accepts_text_encoder_key(module):
            problems.append(f"{module}: ComfyUI drops it")
        shape = reference[target]
        if module not in layers or tuple(layers[module].weight.shape) != shape:
            problems.append(f"{module}: merge maps it elsewhere than {target} {shape}")
            continue
        delta = module_delta(module, tensors, torch.Size(shape))
        if delta.shape != shape or delta.numel() != math.prod(shape):
            problems.append(f"{module}: delta {list(delta.shape)} for {shape}")
    assert problems == []
    # conv_dim 0 (plain LoRA) skips SD 1.5's 52 k x k convs: 22 resnets x 2, conv_in,
    # conv_out, 3 downsamplers, 3 upsamplers.
    unet_count = sum(module.startswith("lora_unet_") for module in modules)
    assert (unet_count, len(modules) - unet_count) == (282 - 52 * (algo == "lora"), 72)
