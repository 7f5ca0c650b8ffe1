"""The version 1.3 LoHA on the real SD 1.5 architecture: every key lands where loaders look.

The reference lists (copied from REFERENCE.md's sources) name every SD 1.5 layer in the
layout AUTOMATIC1111 and ComfyUI patch. Both tools drop a key they cannot place without
an error, so this is the only place a wrong name would show up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sd15_naming import a1111_target, comfyui_accepts_text_encoder_key, reference_layers

from meebs.network.build import NetworkSpec, build_network, count_modules
from meebs.network.save import network_state_dict, save_network

pytestmark = pytest.mark.slow

VERSION_1_3 = NetworkSpec(algo="loha", dim=4, alpha=1.0, conv_dim=4, conv_alpha=1.0)
# Measured with lycoris-lora 4.1.3 (REFERENCE.md section 4).
REFERENCE_FILE_BYTES = 19_820_348


@dataclass(frozen=True)
class BuiltLoha:
    state: dict[str, torch.Tensor]  # fp16, as saved
    layer_shapes: dict[str, tuple[int, ...]]  # module key -> shape of the layer it patches
    counts: tuple[int, int]
    file: Path  # saved with save_network, no metadata


@pytest.fixture(scope="module")
def loha(sd15_random_parts, tmp_path_factory) -> BuiltLoha:
    unet, text_encoder = sd15_random_parts
    torch.manual_seed(0)
    network = build_network(unet, text_encoder, VERSION_1_3)
    file = tmp_path_factory.mktemp("sd15") / "v1.3.safetensors"
    save_network(network, file, {}, torch.float16)
    built = BuiltLoha(
        state=network_state_dict(network, torch.float16),
        layer_shapes={lora.lora_name: tuple(lora.shape) for lora in network.loras},
        counts=count_modules(network),
        file=file,
    )
    network.restore()  # the parts are shared by the whole session
    return built


def module_keys(state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return sorted({key.split(".")[0] for key in state if key.startswith(prefix)})


def placement_problems(loha: BuiltLoha, prefix: str, reference: dict) -> list[str]:
    """Every module that AUTOMATIC1111 would not place on a layer of the right shape."""
    problems = []
    for module in module_keys(loha.state, prefix):
        target = a1111_target(module)
        shape = reference.get(target)
        w1_a, w1_b = loha.state[f"{module}.hada_w1_a"], loha.state[f"{module}.hada_w1_b"]
        if shape is None:
            problems.append(f"{module}: no layer {target}")
        elif len(shape) < 2 or shape != loha.layer_shapes[module]:
            problems.append(f"{module}: {target} is {shape}, not {loha.layer_shapes[module]}")
        elif (w1_a.shape[0], w1_b.shape[1]) != (shape[0], math.prod(shape[1:])):
            problems.append(f"{module}: factors {w1_a.shape} @ {w1_b.shape} do not rebuild {shape}")
    return problems


def test_version_1_3_module_and_tensor_counts(loha):
    assert loha.counts == (282, 72)
    assert len(module_keys(loha.state, "")) == 354
    assert len(loha.state) == 1770
    assert all(tensor.dtype == torch.float16 for tensor in loha.state.values())


def test_every_unet_key_lands_on_an_ldm_layer_of_its_shape(loha):
    reference = reference_layers("sd15_ldm_unet_weights.txt")
    assert placement_problems(loha, "lora_unet_", reference) == []
    targets = [a1111_target(module) for module in module_keys(loha.state, "lora_unet_")]
    assert len(set(targets)) == len(targets) == 282


def test_every_text_encoder_key_lands_in_both_loaders(loha):
    reference = reference_layers("sd15_text_encoder_linear_weights.txt")
    modules = module_keys(loha.state, "lora_te")
    assert all(module.startswith("lora_te_text_model_encoder_layers_") for module in modules)
    assert placement_problems(loha, "lora_te", reference) == []
    assert all(comfyui_accepts_text_encoder_key(module) for module in modules)
    assert {a1111_target(module) for module in modules} == set(reference)


def test_no_key_on_a_module_without_weights(loha, sd15_random_parts):
    unet, _ = sd15_random_parts
    layers = {"lora_unet_" + name.replace(".", "_"): layer for name, layer in unet.named_modules()}
    for module in module_keys(loha.state, "lora_unet_"):
        assert getattr(layers.get(module), "weight", None) is not None, module
    identity_skips = [
        "lora_unet_" + name.replace(".", "_") + "_conv_shortcut"
        for name, layer in unet.named_modules()
        if type(layer).__name__ == "ResnetBlock2D" and layer.conv_shortcut is None
    ]
    assert identity_skips
    assert not set(identity_skips) & set(module_keys(loha.state, "lora_unet_"))


def test_fp16_size_follows_from_the_reference_shapes(loha):
    unet_layers = reference_layers("sd15_ldm_unet_weights.txt")
    text_layers = reference_layers("sd15_text_encoder_linear_weights.txt")
    expected = 0
    for module in module_keys(loha.state, ""):
        shape = {**unet_layers, **text_layers}[a1111_target(module)]
        rank = 4  # dim and conv dim are both 4 in version 1.3
        expected += 2 * 2 * (shape[0] * rank + rank * math.prod(shape[1:])) + 2  # fp16, + alpha
    assert sum(tensor.nbytes for tensor in loha.state.values()) == expected
    assert loha.file.stat().st_size == pytest.approx(REFERENCE_FILE_BYTES, rel=0.01)
