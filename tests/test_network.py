"""The LoHA network on a tiny SD 1.5-shaped model: names, shapes, maths, files, loading.

AUTOMATIC1111 and ComfyUI never complain about a key they cannot place or a factor of the
wrong orientation, so these tests check what they would silently get wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from lycoris.config import PRESET
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from lycoris.utils import str_bool
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from meebs.errors import MeebsError, RecipeError
from meebs.files.safetensors_io import addnet_hash, file_sha256, read_metadata, save_file_atomic
from meebs.network.build import (
    NetworkSpec,
    apply_sd15_preset,
    build_network,
    count_modules,
    lycoris_text_encoder,
)
from meebs.network.load_file import load_network_file
from meebs.network.load_weights import load_network_weights
from meebs.network.save import network_state_dict, save_network

# REFERENCE.md section 11.
TINY_UNET_CONFIG = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "sample_size": 8,
    "norm_num_groups": 32,
}
TINY_TEXT_ENCODER_CONFIG = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
TINY_UNET_MODULES = 83
TINY_TEXT_ENCODER_MODULES = 12  # 2 layers x (q, k, v, out_proj, fc1, fc2)

# The preset targets, restated independently of meebs.network.build (REFERENCE.md section 4).
UNET_TARGET_CLASSES = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
UNET_TARGET_NAMES = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
TEXT_ENCODER_TARGET = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
LOHA_TENSORS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


def tiny_parts(seed: int = 0) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval(), CLIPTextModel(
        TINY_TEXT_ENCODER_CONFIG
    ).eval()


@pytest.fixture
def parts() -> tuple[UNet2DConditionModel, CLIPTextModel]:
    return tiny_parts()


def unet_output(unet: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def text_encoder_output(text_encoder: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def perturb(network: LycorisNetworkKohya, seed: int = 3) -> None:
    """Give every factor deterministic nonzero values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def expected_targets(unet: nn.Module, text_encoder: nn.Module) -> dict[str, nn.Module]:
    """kohya module name -> layer, for every layer the SD 1.5 "full" preset must cover."""
    targets = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d) and (
            name in UNET_TARGET_NAMES or _inside(unet, name, UNET_TARGET_CLASSES)
        ):
            targets["lora_unet_" + name.replace(".", "_")] = layer
    for name, layer in text_encoder.named_modules():
        if TEXT_ENCODER_TARGET.fullmatch(name):
            targets["lora_te_text_model_" + name.replace(".", "_")] = layer
    return targets


def _inside(root: nn.Module, name: str, classes: set[str]) -> bool:
    parts = name.split(".")
    ancestors = (root.get_submodule(".".join(parts[:i])) for i in range(1, len(parts)))
    return any(type(module).__name__ in classes for module in ancestors)


def by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, tensor_name = key.split(".", 1)
        modules.setdefault(module, {})[tensor_name] = tensor
    return modules


def is_kxk(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)


# --- names and shapes -------------------------------------------------------------------


def test_loha_covers_the_preset_with_kohya_names_and_shapes(parts):
    unet, text_encoder = parts
    spec = NetworkSpec(dim=4, alpha=2.0, conv_dim=2, conv_alpha=0.5)
    network = build_network(unet, text_encoder, spec)
    modules = by_module(network_state_dict(network, torch.float32))
    targets = expected_targets(unet, text_encoder)

    assert set(modules) == set(targets)
    assert count_modules(network) == (TINY_UNET_MODULES, TINY_TEXT_ENCODER_MODULES)
    assert all(
        name.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for name in modules
    )
    for name, tensors in modules.items():
        layer = targets[name]
        out_features, in_features, *kernel = layer.weight.shape
        rank, alpha = (2, 0.5) if is_kxk(layer) else (4, 2.0)
        assert set(tensors) == LOHA_TENSORS, name
        for factor in ("w1", "w2"):
            assert tensors[f"hada_{factor}_a"].shape == (out_features, rank), name
            assert tensors[f"hada_{factor}_b"].shape == (rank, in_features * math.prod(kernel)), (
                name
            )
        assert tensors["alpha"].shape == ()
        assert tensors["alpha"].item() == alpha


def test_tucker_factors_only_on_kxk_convs(parts):
    unet, text_encoder = parts
    network = build_network(unet, text_encoder, NetworkSpec(dim=4, conv_dim=2, use_tucker=True))
    modules = by_module(network_state_dict(network, torch.float32))
    targets = expected_targets(unet, text_encoder)

    tucker_modules = [name for name in modules if is_kxk(targets[name])]
    assert tucker_modules
    for name, tensors in modules.items():
        layer = targets[name]
        if name not in tucker_modules:
            assert set(tensors) == LOHA_TENSORS, name
            continue
        out_features, in_features, *kernel = layer.weight.shape
        assert set(tensors) == LOHA_TENSORS | {"hada_t1", "hada_t2"}, name
        for factor in ("1", "2"):
            assert tensors[f"hada_w{factor}_a"].shape == (2, out_features)
            assert tensors[f"hada_w{factor}_b"].shape == (2, in_features)
            assert tensors[f"hada_t{factor}"].shape == (2, 2, *kernel)


@pytest.mark.parametrize("algo", ["locon", "lora"])
def test_locon_and_lora_write_lora_up_down(parts, algo):
    unet, text_encoder = parts
    network = build_network(unet, text_encoder, NetworkSpec(algo=algo, dim=4, conv_dim=2))
    modules = by_module(network_state_dict(network, torch.float32))
    targets = expected_targets(unet, text_encoder)

    assert set(modules) == set(targets)
    for name, tensors in modules.items():
        assert set(tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}, name
        out_features, in_features, *kernel = targets[name].weight.shape
        rank = 2 if is_kxk(targets[name]) else 4
        assert tensors["lora_down.weight"].shape == (rank, in_features, *kernel)
        assert tensors["lora_up.weight"].shape == (out_features, rank, *[1] * len(kernel))


def test_real_text_encoder_is_left_unchanged(parts):
    unet, text_encoder = parts
    names_before = [name for name, _ in text_encoder.named_modules()]
    keys_before = list(text_encoder.state_dict())
    build_network(unet, text_encoder, NetworkSpec())
    assert [name for name, _ in text_encoder.named_modules()] == names_before
    assert list(text_encoder.state_dict()) == keys_before


def test_preset_is_reapplied_over_other_class_state(parts):
    unet, text_encoder = parts
    LycorisNetworkKohya.apply_preset(PRESET["attn-only"])
    network = build_network(unet, text_encoder, NetworkSpec())
    assert count_modules(network) == (TINY_UNET_MODULES, TINY_TEXT_ENCODER_MODULES)


@pytest.mark.parametrize(
    ("train_unet", "train_text_encoder", "prefix", "counts"),
    [
        (True, False, "lora_unet_", (TINY_UNET_MODULES, 0)),
        (False, True, "lora_te_", (0, TINY_TEXT_ENCODER_MODULES)),
    ],
)
def test_untrained_part_gets_no_modules(parts, train_unet, train_text_encoder, prefix, counts):
    unet, text_encoder = parts
    network = build_network(
        unet,
        text_encoder,
        NetworkSpec(),
        train_unet=train_unet,
        train_text_encoder=train_text_encoder,
    )
    assert count_modules(network) == counts
    assert all(key.startswith(prefix) for key in network_state_dict(network, torch.float16))


def test_training_nothing_is_refused(parts):
    with pytest.raises(RecipeError, match="nothing to train"):
        build_network(*parts, NetworkSpec(), train_unet=False, train_text_encoder=False)


def test_init_follows_the_callers_seed():
    def init(seed: int, *, train_text_encoder: bool = True) -> dict[str, torch.Tensor]:
        unet, text_encoder = tiny_parts()
        torch.manual_seed(seed)
        network = build_network(
            unet, text_encoder, NetworkSpec(), train_text_encoder=train_text_encoder
        )
        return network_state_dict(network, torch.float32)

    first, again, other = init(5), init(5), init(6)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    unet_only = init(5, train_text_encoder=False)
    assert all(torch.equal(unet_only[key], first[key]) for key in unet_only)


# --- behaviour and maths ----------------------------------------------------------------


def test_untrained_loha_changes_nothing(parts, tmp_path):
    unet, text_encoder = parts
    unet_before, text_before = unet_output(unet), text_encoder_output(text_encoder)
    network = build_network(unet, text_encoder, NetworkSpec())
    assert torch.equal(unet_output(unet), unet_before)
    assert torch.equal(text_encoder_output(text_encoder), text_before)

    # In the file, as the loaders see it: w2_a is zero, so every delta is zero.
    path = tmp_path / "untrained.safetensors"
    save_network(network, path, {}, torch.float16)
    for name, tensors in by_module(load_file(path)).items():
        assert not tensors["hada_w2_a"].any(), name
        assert tensors["hada_w1_a"].any() and tensors["hada_w2_b"].any(), name


def loader_delta(tensors: dict[str, torch.Tensor], module: str, shape: torch.Size) -> torch.Tensor:
    """The LoHA delta as AUTOMATIC1111 and ComfyUI compute it from a file (REFERENCE §4, §6)."""
    w1_a, w1_b = tensors[f"{module}.hada_w1_a"], tensors[f"{module}.hada_w1_b"]
    w2_a, w2_b = tensors[f"{module}.hada_w2_a"], tensors[f"{module}.hada_w2_b"]
    scale = tensors[f"{module}.alpha"] / w1_b.shape[0]
    return ((w1_a @ w1_b) * (w2_a @ w2_b) * scale).reshape(shape)


@pytest.mark.parametrize(
    ("part", "layer_name", "inputs"),
    [
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", (3, 32)),
        ("unet", "down_blocks.1.resnets.0.conv1", (2, 32, 8, 8)),
        ("text_encoder", "encoder.layers.1.mlp.fc1", (3, 32)),
    ],
)
def test_file_factors_give_the_delta_the_network_applies(tmp_path, part, layer_name, inputs):
    unet, text_encoder = tiny_parts()
    network = build_network(unet, text_encoder, NetworkSpec(dim=4, alpha=2.0, conv_dim=3))
    perturb(network)
    path = tmp_path / "trained.safetensors"
    save_network(network, path, {}, torch.float32)
    tensors = load_file(path)

    layer = (unet if part == "unet" else text_encoder).get_submodule(layer_name)
    prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
    delta = loader_delta(tensors, prefix + layer_name.replace(".", "_"), layer.weight.shape)
    assert delta.abs().max() > 1e-3
    x = torch.randn(inputs, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        patched = layer(x)  # lycoris' hooked forward
        if isinstance(layer, nn.Conv2d):
            merged = F.conv2d(x, layer.weight + delta, layer.bias, layer.stride, layer.padding)
        else:
            merged = F.linear(x, layer.weight + delta, layer.bias)
    torch.testing.assert_close(patched, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "spec", [NetworkSpec(), NetworkSpec(use_tucker=True), NetworkSpec(algo="locon")]
)
def test_saved_file_loads_back_through_lycoris_with_the_same_outputs(tmp_path, spec):
    unet, text_encoder = tiny_parts()
    network = build_network(unet, text_encoder, spec)
    perturb(network)
    path = tmp_path / "trained.safetensors"
    save_network(network, path, {}, torch.float32)
    trained_unet, trained_text = unet_output(unet), text_encoder_output(text_encoder)

    fresh_unet, fresh_text_encoder = tiny_parts()
    assert (unet_output(fresh_unet) - trained_unet).abs().max() > 1e-3
    assert (text_encoder_output(fresh_text_encoder) - trained_text).abs().max() > 1e-3
    apply_sd15_preset()
    wrapped = lycoris_text_encoder(fresh_text_encoder)
    loaded, _ = create_network_from_weights(
        1.0, str(path), None, wrapped, fresh_unet, weights_sd=None, for_inference=True
    )
    loaded.apply_to(wrapped, fresh_unet, apply_text_encoder=True, apply_unet=True)

    assert count_modules(loaded) == count_modules(network)
    torch.testing.assert_close(unet_output(fresh_unet), trained_unet, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        text_encoder_output(fresh_text_encoder), trained_text, atol=1e-5, rtol=0
    )


def test_load_network_file_applies_a_saved_network(tmp_path):
    unet, text_encoder = tiny_parts()
    network = build_network(unet, text_encoder, NetworkSpec())
    perturb(network)
    path = tmp_path / "trained.safetensors"
    save_network(network, path, {}, torch.float32)

    fresh_unet, fresh_text_encoder = tiny_parts()
    load_network_file(path, fresh_unet, fresh_text_encoder)
    torch.testing.assert_close(unet_output(fresh_unet), unet_output(unet), atol=1e-5, rtol=0)


def test_load_network_file_refuses_modules_that_match_no_layer(tmp_path, parts):
    path = tmp_path / "foreign.safetensors"
    tensors = {
        "lora_te_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.ones(32, 4),
        "lora_te_encoder_layers_0_self_attn_q_proj.hada_w1_b": torch.ones(4, 32),
        "lora_te_encoder_layers_0_self_attn_q_proj.hada_w2_a": torch.ones(32, 4),
        "lora_te_encoder_layers_0_self_attn_q_proj.hada_w2_b": torch.ones(4, 32),
        "lora_te_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
    }
    save_file_atomic(tensors, path, {})
    with pytest.raises(MeebsError, match=r"match no layer.*lora_te_encoder_layers_0"):
        load_network_file(path, *parts)


# --- continuing from a file -------------------------------------------------------------


def saved_network(tmp_path, spec: NetworkSpec, dtype: torch.dtype = torch.float32):
    unet, text_encoder = tiny_parts()
    network = build_network(unet, text_encoder, spec)
    perturb(network)
    path = tmp_path / "previous.safetensors"
    save_network(network, path, {}, dtype)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_network_weights_continues_from_a_file(tmp_path, parts, dtype):
    path = saved_network(tmp_path, NetworkSpec(), dtype)
    torch.manual_seed(9)
    network = build_network(*parts, NetworkSpec())
    load_network_weights(network, path)
    stored, loaded = load_file(path), network_state_dict(network, torch.float32)
    assert stored.keys() == loaded.keys()
    assert all(torch.equal(stored[key].float(), loaded[key]) for key in stored)


@pytest.mark.parametrize(
    ("saved", "recipe", "message"),
    [
        (NetworkSpec(dim=8), NetworkSpec(dim=4), "was trained with dim 8, the recipe says dim 4"),
        (
            NetworkSpec(conv_dim=8),
            NetworkSpec(conv_dim=4),
            "conv dim 8, the recipe says conv dim 4",
        ),
        (NetworkSpec(alpha=2.0), NetworkSpec(alpha=1.0), "alpha 2, the recipe says alpha 1"),
        (NetworkSpec(algo="locon"), NetworkSpec(), "does not fit this network"),
        (NetworkSpec(use_tucker=True), NetworkSpec(), "does not fit this network"),
    ],
)
def test_load_network_weights_explains_a_mismatch(tmp_path, parts, saved, recipe, message):
    path = saved_network(tmp_path, saved)
    network = build_network(*parts, recipe)
    with pytest.raises(MeebsError, match=re.escape(message)) as error:
        load_network_weights(network, path)
    assert str(path) in str(error.value)


# --- the file ---------------------------------------------------------------------------


def header_of(raw: bytes) -> tuple[int, list]:
    """(header length, header as ordered key/value pairs, nested) of safetensors bytes."""
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8 : 8 + length], object_pairs_hook=list)


def test_saved_file_is_canonical_reproducible_and_hashed(tmp_path, parts):
    network = build_network(*parts, NetworkSpec())
    perturb(network)
    metadata = {"ss_network_dim": "4", "modelspec.title": "meeb", "ss_comment": "ünïcode", "a": "1"}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_network(network, first, metadata, torch.float16)
    save_network(network, second, dict(reversed(metadata.items())), torch.float16)

    raw = first.read_bytes()
    assert raw == second.read_bytes()
    length, header = header_of(raw)
    assert length % 8 == 0
    keys = [key for key, _ in header]
    assert keys == sorted(keys) and keys[0] == "__metadata__"
    metadata_keys = [key for key, _ in dict(header)["__metadata__"]]
    assert metadata_keys == sorted(metadata_keys)

    data_hash = hashlib.sha256(raw[8 + length :]).hexdigest()
    assert addnet_hash(first) == data_hash
    assert read_metadata(first) == {**metadata, "sshs_model_hash": data_hash}
    assert file_sha256(first) == hashlib.sha256(raw).hexdigest()
    with safe_open(first, "pt") as opened:
        assert opened.metadata() == read_metadata(first)
        expected = network_state_dict(network, torch.float16)
        assert set(opened.keys()) == set(expected)
        assert all(torch.equal(opened.get_tensor(key), expected[key]) for key in expected)


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"a finished network")
    with pytest.raises(MeebsError, match=re.escape(str(path))):
        save_file_atomic({"x": torch.zeros(2)}, path, {})
    assert path.read_bytes() == b"a finished network"

    save_file_atomic({"x": torch.zeros(2)}, path, {}, overwrite=True)
    assert torch.equal(load_file(path)["x"], torch.zeros(2))
    assert list(tmp_path.iterdir()) == [path]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    renamed = []

    def failing_replace(source, destination):
        renamed.append(os.path.basename(source))
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(MeebsError, match=r"cannot write .*net.safetensors: disk full"):
        save_file_atomic({"x": torch.zeros(2)}, tmp_path / "net.safetensors", {"a": "b"})
    assert renamed[0].startswith(".net.safetensors") and renamed[0].endswith(".tmp")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_file_is_a_meebs_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(MeebsError, match="not a readable safetensors file"):
        read_metadata(path)
    with pytest.raises(MeebsError, match="does not exist"):
        addnet_hash(tmp_path / "missing.safetensors")


def test_state_dict_is_cast_copied_and_contiguous(parts):
    network = build_network(*parts, NetworkSpec())
    state = network_state_dict(network, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in state.values())
    fp32 = network_state_dict(network, torch.float32)
    key = next(key for key in fp32 if key.endswith("hada_w1_b"))
    fp32[key].zero_()
    assert network_state_dict(network, torch.float32)[key].any()


# --- ss_network_args --------------------------------------------------------------------


def test_network_args_are_kohya_strings():
    args = NetworkSpec(algo="loha", dim=4, alpha=1.0, conv_dim=4, conv_alpha=1.0).to_network_args()
    assert args == {
        "algo": "loha",
        "conv_dim": "4",
        "conv_alpha": "1",
        "use_tucker": "False",
        "preset": "full",
    }
    assert str_bool(args["use_tucker"]) is False  # what lycoris makes of it
    tucker = NetworkSpec(conv_alpha=0.5, use_tucker=True).to_network_args()
    assert tucker["conv_alpha"] == "0.5" and str_bool(tucker["use_tucker"]) is True
    assert not {"use_cp", "use_conv_cp", "disable_conv_cp"} & set(tucker)
    assert NetworkSpec(algo="locon", dropout=0.1).to_network_args()["dropout"] == "0.1"


@pytest.mark.parametrize(
    "fields",
    [
        {"algo": "boft"},  # a lycoris algorithm the recipe does not offer
        {"dim": 0},
        {"conv_dim": -1},
        {"alpha": -1.0},
        {"algo": "locon", "dropout": 1.0},
        {"algo": "loha", "dropout": 0.1},
    ],
)
def test_spec_rejects_what_lycoris_would_misread(fields):
    with pytest.raises(RecipeError):
        NetworkSpec(**fields)
