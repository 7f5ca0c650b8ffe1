"""`merge` on the tiny model: merged weights give what the network gives at run time.

The reference is lycoris' own forward (`load_network_file` at multiplier W), the merge is
our delta code (`meebs.network.deltas`): two independent implementations of the same formula.
The tiny model has every layer kind SD 1.5 has: Linear, 1x1 conv (proj_in/out) and 3x3
convs, in both the UNet and the text encoder.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from random_networks import random_network
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.files.safetensors_io import save_file_atomic
from meebs.interop.ldm_export import ldm_state_dict, save_ldm_file
from meebs.models.base import TINY_CONFIGS, BaseModel, sha256_file
from meebs.models.builtin_models import build_sd15_random, build_tiny
from meebs.models.loading import load_base_model
from meebs.models.sampling import SamplePrompt, generate_samples
from meebs.models.single_file import TensorReader, open_single_file, parts_from_ldm
from meebs.network.build import NetworkSpec
from meebs.network.deltas import module_delta
from meebs.network.load_file import load_network_file
from meebs.network.save import save_network
from meebs.use.merge import (
    merge,
    merge_into,
    merge_single_file,
    parse_network_arg,
    pin_path,
    read_network,
)

SPECS = {
    "loha": NetworkSpec(algo="loha", dim=4, alpha=1.0, conv_dim=4, conv_alpha=2.0),
    "loha-tucker": NetworkSpec(algo="loha", dim=4, conv_dim=4, use_tucker=True),
    "locon": NetworkSpec(algo="locon", dim=4, alpha=2.0, conv_dim=4, conv_alpha=1.0),
    "lora": NetworkSpec(algo="lora", dim=4, alpha=1.0, conv_dim=0),  # Linear and 1x1 only
    "locon-tucker": NetworkSpec(algo="locon", dim=4, conv_dim=4, use_tucker=True),
}
# fp32 sums in another order: the merged layer computes x @ (W + dW) in one op, lycoris
# builds W + m*dW from factors in its own order. Observed: at most 1.3e-6 of the output.
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def eager_lycoris(monkeypatch):
    """Run lycoris' eager delta code instead of torch.compile-ing it per layer shape.

    lycoris 4.1.3 compiles its kernels on first use (~10 s per test on two cores); its
    eager path is the reference body those kernels match. It honours TORCHDYNAMO_DISABLE,
    but caches the backend list in `_available`, which is reset here and restored after.
    """
    from lycoris.kernels import dispatch

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.setattr(dispatch, "_available", None)


def trained_network(tmp_path, spec: NetworkSpec, name: str = "net", model=None, std=0.3):
    """A network file whose every factor is random, as after training (init has w2_a = 0)."""
    network = random_network(spec, model, std=std)
    file = tmp_path / f"{name}.safetensors"
    save_network(network, file, {}, torch.float32)
    network.restore()
    return file


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states, UNet noise prediction) for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        context = model.text_encoder(ids).last_hidden_state
        noise = model.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context)
    return context, noise.sample


def with_network(file, weight: float):
    model = build_tiny()
    load_network_file(file, model.unet, model.text_encoder, multiplier=weight)
    return model


def merged(file, weight: float):
    model = build_tiny()
    merge_into(model.unet, model.text_encoder, read_network(file), weight)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("algo", SPECS)
@pytest.mark.parametrize("weight", [0.5, 1.0, -0.7])
def test_merged_model_equals_network_at_weight(tmp_path, algo, weight):
    file = trained_network(tmp_path, SPECS[algo])
    base = outputs(build_tiny())
    expected, actual = outputs(with_network(file, weight)), outputs(merged(file, weight))
    for part_expected, part_actual, part_base in zip(expected, actual, base, strict=True):
        assert relative_error(part_actual, part_expected) < RELATIVE_TOLERANCE
        assert relative_error(part_expected, part_base) > 1e-3  # the network does something


def test_weight_zero_gives_exactly_the_base_output(tmp_path):
    file = trained_network(tmp_path, SPECS["loha"])
    for base_part, merged_part in zip(
        outputs(build_tiny()), outputs(merged(file, 0.0)), strict=True
    ):
        assert torch.equal(base_part, merged_part)


def test_two_networks_add_up(tmp_path):
    first = trained_network(tmp_path, SPECS["loha"], "first")
    second = trained_network(tmp_path, SPECS["lora"], "second")
    both = build_tiny()
    merge_into(both.unet, both.text_encoder, read_network(first), 0.5)
    merge_into(both.unet, both.text_encoder, read_network(second), -1.0)
    reference = build_tiny()
    load_network_file(first, reference.unet, reference.text_encoder, multiplier=0.5)
    load_network_file(second, reference.unet, reference.text_encoder, multiplier=-1.0)
    for actual, expected in zip(outputs(both), outputs(reference), strict=True):
        assert relative_error(actual, expected) < RELATIVE_TOLERANCE


def test_merge_then_generate_equals_generate_with_network(tmp_path):
    """Through the real sampling path: VAE-decoded, rounded to uint8 PIL images.

    The latents agree to ~1e-6; rounding to 8 bits can still flip a value that sits on a
    .5 boundary by one level, so ±2 levels are allowed, and the mean must stay tiny.
    """
    file = trained_network(tmp_path, SPECS["loha"])
    prompt = SamplePrompt(
        prompt="meeb", negative="", width=64, height=64, seed=3, steps=3, cfg=7.0, sampler="DDIM"
    )

    def draw(model) -> np.ndarray:
        images = generate_samples(
            model,
            prompts=[prompt],
            device="cpu",
            dtype=torch.float32,
        )
        return np.asarray(images[0], dtype=np.int16)

    with_lycoris, with_merge = draw(with_network(file, 0.8)), draw(merged(file, 0.8))
    assert np.abs(with_lycoris - with_merge).max() <= 2
    assert np.abs(with_lycoris - with_merge).mean() < 0.05
    assert np.abs(with_lycoris - draw(build_tiny())).max() > 10  # the network shows


def test_cli_merge_writes_a_pinned_folder_that_loads_back(tmp_path, capsys):
    file = trained_network(tmp_path, SPECS["locon"])
    into = tmp_path / "merged"
    assert main(["merge", f"{file}:-0.7", "--into", str(into), "--model", "builtin:tiny"]) == 0
    digest = pin_path(into).read_text().split()[0]
    assert digest in capsys.readouterr().out
    loaded = load_base_model(builtin=None, path=into, sha256=digest, allow_pickle=False)
    expected = merged(file, -0.7)
    for part in ("unet", "text_encoder", "vae"):
        expected_state = getattr(expected, part).state_dict()
        for key, value in getattr(loaded, part).state_dict().items():
            assert torch.equal(value, expected_state[key]), f"{part}.{key}"
    assert (into / "text_encoder" / "model.safetensors").exists()
    assert all(key.startswith("text_model.") for key in read_network_keys(into))


def read_network_keys(folder):
    from safetensors import safe_open

    with safe_open(folder / "text_encoder" / "model.safetensors", framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize(
    ("text", "path", "weight"),
    [
        ("a.safetensors", "a.safetensors", 1.0),
        ("d/a.safetensors:0.5", "d/a.safetensors", 0.5),
        ("a.safetensors:-1", "a.safetensors", -1.0),
    ],
)
def test_network_argument(text, path, weight):
    parsed = parse_network_arg(text)
    assert (str(parsed.path), parsed.weight) == (path, weight)


@pytest.mark.parametrize("text", ["a.safetensors:", "a.safetensors:x", "a.safetensors:nan", ":1"])
def test_malformed_weight_is_one_line(text):
    with pytest.raises(MeebsError, match="must be a number") as error:
        parse_network_arg(text)
    assert "\n" not in str(error.value)


def bad_merge(tmp_path, tensors: dict[str, torch.Tensor]) -> str:
    file = tmp_path / "bad.safetensors"
    save_file(tensors, file)
    into = tmp_path / "out"
    with pytest.raises(MeebsError) as error:
        merge([parse_network_arg(str(file))], into, builtin="tiny", model_path=None, sha256=None)
    assert not into.exists() and not pin_path(into).exists()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_file_that_is_not_a_network(tmp_path):
    assert "is not a LoRA/LoCon/LoHA network" in bad_merge(tmp_path, {"w": torch.ones(2)})


def test_an_sdxl_network(tmp_path):
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    message = bad_merge(
        tmp_path,
        {f"{key}.lora_down.weight": torch.ones(4, 32), f"{key}.lora_up.weight": torch.ones(32, 4)},
    )
    assert f"{key} is an SDXL key" in message


def test_a_shape_mismatch_names_key_and_shapes(tmp_path):
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 32 x 32 in the tiny model
    message = bad_merge(
        tmp_path,
        {
            f"{key}.lora_down.weight": torch.ones(4, 768),
            f"{key}.lora_up.weight": torch.ones(768, 4),
        },
    )
    assert (
        f"{key}: its factors rebuild a [768, 768] delta, the layer's weight is [32, 32]" in message
    )


def test_an_existing_output_is_never_overwritten(tmp_path):
    file = trained_network(tmp_path, SPECS["lora"])
    into = tmp_path / "merged"
    into.mkdir()
    with pytest.raises(MeebsError, match="already exists; refusing to overwrite"):
        merge([parse_network_arg(str(file))], into, builtin="tiny", model_path=None, sha256=None)
    assert list(into.iterdir()) == []


# Single-file output in the original LDM layout (A1111 / ComfyUI checkpoints folder)

REFERENCE_SD15 = Path(__file__).parent / "reference_sd15"
# Keys the published v1-5-pruned(-emaonly) file has and we do not write: A1111 and
# ComfyUI rebuild them (schedule buffers from their config, position_ids as a constant),
# and our own loader ignores them. EMA copies (`model_ema.*`) are dropped on purpose.
OMITTED_REAL_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "model_ema.decay",
    "model_ema.num_updates",
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# A few VAE keys of the published SD 1.5 file, with their shapes: the decoder's up blocks
# are numbered in reverse, and attention is 1x1 convs.
REAL_SD15_VAE_KEYS = {
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.mid.attn_1.norm.weight": (512,),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
}


def load_tiny_ldm(path) -> BaseModel:
    """A tiny single file read back with the forward (diffusers) converters.

    `load_base_model(path=...)` configures single files from the SD 1.5 configs only (and
    refuses a 32-wide context), so the tiny file is read with its own configs here.
    """
    unet, vae, text_encoder = parts_from_ldm(load_file(path), TINY_CONFIGS, path)
    template = build_tiny()
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=template.tokenizer,
        noise_scheduler=template.noise_scheduler,
        sha256=sha256_file(path),
        name=path.stem,
        legacy_hash=None,
        source=str(path),
    )


def assert_same_weights(actual: BaseModel, expected: BaseModel, dtype=torch.float32) -> None:
    """Bit-identical after the save's rounding to `dtype`."""
    for part in ("unet", "vae", "text_encoder"):
        expected_state = getattr(expected, part).state_dict()
        actual_state = getattr(actual, part).state_dict()
        assert actual_state.keys() == expected_state.keys(), part
        for key, value in expected_state.items():
            assert actual_state[key].dtype == torch.float32, f"{part}.{key}"
            assert torch.equal(actual_state[key], value.to(dtype).float()), f"{part}.{key}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_ldm_file_round_trips_bit_identical(tmp_path, dtype):
    path = tmp_path / "tiny.safetensors"
    digest = save_ldm_file(build_tiny(), path, dtype)
    assert digest == sha256_file(path)
    assert_same_weights(load_tiny_ldm(path), build_tiny(), dtype)
    with safe_open(path, framework="pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {  # noqa: SIM118
            "F32" if dtype == torch.float32 else "F16"
        }


def test_ldm_keys_use_the_a1111_layout():
    state = ldm_state_dict(build_tiny())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(key.startswith(prefixes) for key in state)
    text = [key for key in state if key.startswith("cond_stage_model.")]
    assert text and all(key.startswith("cond_stage_model.transformer.text_model.") for key in text)
    assert not any(key.endswith("position_ids") for key in state)
    for coder in ("encoder", "decoder"):
        for layer in ("q", "k", "v", "proj_out"):
            assert state[f"first_stage_model.{coder}.mid.attn_1.{layer}.weight"].ndim == 4
    assert "model.diffusion_model.input_blocks.0.0.weight" in state  # conv_in
    assert "model.diffusion_model.out.2.weight" in state  # conv_out


def test_cli_merge_into_a_single_file_equals_the_folder(tmp_path, capsys):
    """Same merge, two layouts: the weights and the generated image are identical."""
    file = trained_network(tmp_path, SPECS["loha"])
    single, folder = tmp_path / "merged.safetensors", tmp_path / "merged"
    common = [f"{file}:0.8", "--model", "builtin:tiny", "--save-precision", "fp32"]
    assert main(["merge", *common, "--into", str(single)]) == 0
    assert main(["merge", *common, "--into", str(folder)]) == 0
    digest = pin_path(single).read_text().split()[0]
    assert pin_path(single).read_text() == f"{digest}  merged.safetensors\n"
    assert digest == sha256_file(single) and digest in capsys.readouterr().out
    from_file = load_tiny_ldm(single)
    from_folder = load_base_model(
        builtin=None,
        path=folder,
        sha256=pin_path(folder).read_text().split()[0],
        allow_pickle=False,
    )
    assert_same_weights(from_file, merged(file, 0.8))
    assert_same_weights(from_file, from_folder)
    for a, b in zip(outputs(from_file), outputs(from_folder), strict=True):
        assert torch.equal(a, b)
    prompt = SamplePrompt(
        prompt="meeb", negative="", width=64, height=64, seed=3, steps=3, cfg=7.0, sampler="DDIM"
    )
    images = [
        np.asarray(generate_samples(model, prompts=[prompt], device="cpu", dtype=torch.float32)[0])
        for model in (from_file, from_folder)
    ]
    assert np.array_equal(images[0], images[1])
    assert list(tmp_path.glob(".*")) == []  # no temp file left behind


def test_default_precision_is_fp16_for_a_file_and_fp32_for_a_folder(tmp_path):
    file = trained_network(tmp_path, SPECS["lora"])
    outputs_ = {name: tmp_path / name for name in ("a.safetensors", "b", "c")}
    for name, extra in (("a.safetensors", []), ("b", []), ("c", ["--save-precision", "fp16"])):
        args = ["merge", str(file), "--model", "builtin:tiny", "--into", str(outputs_[name])]
        assert main(args + extra) == 0
    dtypes = {}
    for name, path in (
        ("a.safetensors", outputs_["a.safetensors"]),
        ("b", outputs_["b"] / "unet" / "diffusion_pytorch_model.safetensors"),
        ("c", outputs_["c"] / "unet" / "diffusion_pytorch_model.safetensors"),
    ):
        with safe_open(path, framework="pt") as handle:
            dtypes[name] = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    assert dtypes == {"a.safetensors": {"F16"}, "b": {"F32"}, "c": {"F16"}}
    digest = pin_path(outputs_["c"]).read_text().split()[0]
    assert_same_weights(
        load_base_model(builtin=None, path=outputs_["c"], sha256=digest, allow_pickle=False),
        merged(file, 1.0),
        torch.float16,
    )


def test_an_existing_single_file_is_never_overwritten(tmp_path):
    file = trained_network(tmp_path, SPECS["lora"])
    into = tmp_path / "merged.safetensors"
    into.write_bytes(b"keep me")
    with pytest.raises(MeebsError, match="already exists; refusing to overwrite"):
        merge([parse_network_arg(str(file))], into, builtin="tiny", model_path=None, sha256=None)
    assert into.read_bytes() == b"keep me" and not pin_path(into).exists()


@pytest.mark.parametrize("name", ["merged.ckpt", "merged.pt"])
def test_a_pickle_output_name_is_refused(tmp_path, name):
    file = trained_network(tmp_path, SPECS["lora"])
    with pytest.raises(MeebsError, match="writes no pickle files"):
        merge(
            [parse_network_arg(str(file))],
            tmp_path / name,
            builtin="tiny",
            model_path=None,
            sha256=None,
        )
    assert not (tmp_path / name).exists()


def test_a_failed_single_file_merge_writes_nothing(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(2)}, bad)
    into = tmp_path / "out.safetensors"
    with pytest.raises(MeebsError, match="is not a LoRA"):
        merge([parse_network_arg(str(bad))], into, builtin="tiny", model_path=None, sha256=None)
    assert not into.exists() and not pin_path(into).exists()


def reference_weights(file: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """`prefix + name + .weight` -> shape, from a `name 320x4x3x3` reference list."""
    lines = (REFERENCE_SD15 / file).read_text().splitlines()
    entries = (line.split() for line in lines if line.strip() and not line.startswith("#"))
    return {
        f"{prefix}{name}.weight": tuple(int(n) for n in shape.split("x")) for name, shape in entries
    }


@pytest.fixture(scope="module")
def sd15_single_file(tmp_path_factory) -> tuple[BaseModel, Path, str]:
    """(the random SD 1.5, the 2.1 GB fp16 single file `merge` writes of it with no
    network, its sha256): made once for the two full-size tests, ~40 s on two cores."""
    into = tmp_path_factory.mktemp("sd15") / "sd15.safetensors"
    digest = merge([], into, builtin="sd15-random", model_path=None, sha256=None)
    return build_sd15_random(), into, digest


@pytest.mark.slow
def test_sd15_single_file_has_the_real_key_layout_and_loads_back_pinned(sd15_single_file):
    """Full SD 1.5 architecture: merge (no network) -> file -> `load_base_model(path, pin)`."""
    model, into, digest = sd15_single_file
    with safe_open(into, framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    unet_weights = {
        key: shape
        for key, shape in shapes.items()
        if key.startswith("model.diffusion_model.") and key.endswith(".weight")
    }
    assert unet_weights == reference_weights("sd15_ldm_unet_weights.txt", "model.diffusion_model.")
    text_linears = reference_weights(
        "sd15_text_encoder_linear_weights.txt", "cond_stage_model.transformer."
    )
    assert text_linears.items() <= shapes.items()
    assert REAL_SD15_VAE_KEYS.items() <= shapes.items()
    assert not set(OMITTED_REAL_KEYS) & shapes.keys()
    assert not any(key.startswith("model_ema.") for key in shapes)
    loaded = load_base_model(builtin=None, path=into, sha256=digest, allow_pickle=False)
    assert loaded.sha256 == digest
    assert_same_weights(loaded, model, torch.float16)


# The streamed single-file merge (a single .safetensors base -> a single file) against the
# in-memory merge it replaced, which stays here as the byte-for-byte reference.


def in_memory_single_file_merge(base_file: Path, contents, into: Path, precision: str) -> str:
    """What `merge` did with a single-file base before it streamed: the whole base read
    (its three parts' keys, as `load_file` did) into a `BaseModel` (fp32), every network
    merged in place (`merge_into`), then the LDM state dict converted to the output dtype
    and written by one `safetensors.torch.save` (`save_file_atomic`, format "pt")."""
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[precision]
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    with safe_open(base_file, framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)}  # noqa: SIM118
    unet, vae, text_encoder = parts_from_ldm(state, TINY_CONFIGS, base_file)
    template = build_tiny()
    model = BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=template.tokenizer,
        noise_scheduler=template.noise_scheduler,
        sha256="0" * 64,
        name="base",
        legacy_hash=None,
        source=str(base_file),
    )
    for network, modules in contents:
        merge_into(model.unet, model.text_encoder, modules, network.weight)
    ldm = {
        key: value.detach().to(dtype).contiguous() for key, value in ldm_state_dict(model).items()
    }
    save_file_atomic(ldm, into, {"format": "pt"})
    return sha256_file(into)


def tiny_base_file(tmp_path, variant: str) -> Path:
    """The tiny model as a single file. "fp16": as `merge` writes one. "published": like
    the real SD 1.5 file: mixed dtypes (UNet fp16, text encoder fp32, VAE bf16), the keys
    our export drops (EMA, schedule buffers, int64 position_ids), in safetensors' own
    order and header, not ours."""
    path = tmp_path / f"base-{variant}.safetensors"
    if variant == "fp16":
        save_ldm_file(build_tiny(seed=3), path, torch.float16)
        return path
    state = {}
    for key, value in ldm_state_dict(build_tiny(seed=3)).items():
        dtype = {"model.": torch.float16, "first_stage_model.": torch.bfloat16}.get(
            key[: key.index(".") + 1], torch.float32
        )
        state[key] = value.detach().to(dtype).contiguous()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        16
    ).reshape(1, 16)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_modelconv_inweight"] = torch.ones(3)
    state["betas"] = torch.linspace(0.00085, 0.012, 10, dtype=torch.float64)
    save_file(state, path, {"format": "pt", "note": "published"})
    return path


def streamed(base_file: Path, contents, into: Path, precision: str) -> str:
    base = open_single_file(base_file, None, config_dir=TINY_CONFIGS)
    return merge_single_file(contents, base, into, precision)


# The algorithms added later: IA3, Diag-OFT, GLoRA and DoRA change a layer by an amount
# computed from its weight as merged so far (`module_delta(base=...)`), Full also its bias.
ALGO_SPECS = {
    **SPECS,
    "lokr": NetworkSpec(algo="lokr", dim=4, conv_dim=4),
    "glora": NetworkSpec(algo="glora", dim=4, conv_dim=4),
    "diag-oft": NetworkSpec(algo="diag-oft", dim=4, conv_dim=4),
    "full": NetworkSpec(algo="full"),
    "ia3": NetworkSpec(algo="ia3"),
    "loha-dora": NetworkSpec(algo="loha", dim=4, conv_dim=4, dora_wd=True),
}
NETWORK_SETS = {
    "none": [],
    "loha": [("loha", 0.8)],
    "lora-and-loha": [("lora", -0.5), ("loha", 1.0), ("locon-tucker", 0.3)],
    "loha-tucker": [("loha-tucker", 2.0)],
    "every-algo": [
        ("full", 0.5),
        ("ia3", 1.0),
        ("diag-oft", 0.7),
        ("lokr", -0.4),
        ("glora", 0.6),
        ("loha-dora", 1.0),
    ],
}


@pytest.mark.parametrize(
    ("variant", "precision", "networks"),
    [
        ("fp16", "fp16", "loha"),
        ("fp16", "fp32", "lora-and-loha"),
        ("published", "fp16", "lora-and-loha"),
        ("published", "fp32", "loha-tucker"),
        ("published", "fp16", "none"),
        ("published", "fp16", "every-algo"),
    ],
)
def test_streamed_merge_writes_the_bytes_of_the_in_memory_merge(
    tmp_path, variant, precision, networks
):
    base_file = tiny_base_file(tmp_path, variant)
    weighted = [
        parse_network_arg(f"{trained_network(tmp_path, ALGO_SPECS[algo], algo, std=0.1)}:{weight}")
        for algo, weight in NETWORK_SETS[networks]
    ]
    contents = [(network, read_network(network.path)) for network in weighted]
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    expected = in_memory_single_file_merge(base_file, contents, old, precision)
    assert streamed(base_file, contents, new, precision) == expected
    assert new.read_bytes() == old.read_bytes()
    assert sha256_file(new) == expected
    assert list(tmp_path.glob(".*")) == []


def test_streamed_merge_adds_a_full_networks_bias_change(tmp_path):
    base_file = tiny_base_file(tmp_path, "fp16")
    network = parse_network_arg(f"{trained_network(tmp_path, ALGO_SPECS['full'], 'full')}:0.5")
    modules = read_network(network.path)
    into = tmp_path / "merged.safetensors"
    streamed(base_file, [(network, modules)], into, "fp32")
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias"
    diff_b = modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]["diff_b"]
    before, after = load_file(base_file)[key].float(), load_file(into)[key]
    assert torch.equal(after, before.add(diff_b.float(), alpha=0.5))
    assert not torch.equal(after, before)


def test_save_ldm_file_writes_the_bytes_of_one_safetensors_save(tmp_path):
    """The streamed writer against `safetensors.torch.save` of the whole state dict."""
    model = build_tiny()
    for dtype in (torch.float16, torch.float32):
        new, old = tmp_path / f"new-{dtype}.safetensors", tmp_path / f"old-{dtype}.safetensors"
        digest = save_ldm_file(model, new, dtype)
        state = {k: v.detach().to(dtype).contiguous() for k, v in ldm_state_dict(model).items()}
        save_file_atomic(state, old, {"format": "pt"})
        assert new.read_bytes() == old.read_bytes()
        assert digest == hashlib.sha256(old.read_bytes()).hexdigest()


def test_streamed_merge_refuses_a_weight_fp16_cannot_hold_and_writes_nothing(tmp_path):
    base_file = tiny_base_file(tmp_path, "fp16")
    network = parse_network_arg(f"{trained_network(tmp_path, SPECS['loha'])}:1e9")
    into = tmp_path / "merged.safetensors"
    with pytest.raises(MeebsError) as error:
        streamed(base_file, [(network, read_network(network.path))], into, "fp16")
    assert f"{network.path}: the merged text encoder weight encoder.layers." in str(error.value)
    assert "is NaN or inf in fp16" in str(error.value)
    assert not into.exists() and list(tmp_path.glob(".*")) == []
    streamed(base_file, [(network, read_network(network.path))], into, "fp32")  # fp32 holds it


def test_streamed_merge_names_an_unplaced_key_before_writing(tmp_path):
    base_file = tiny_base_file(tmp_path, "fp16")
    file = tmp_path / "odd.safetensors"
    key = "lora_unet_no_such_layer"
    save_file(
        {f"{key}.lora_down.weight": torch.ones(4, 8), f"{key}.lora_up.weight": torch.ones(8, 4)},
        file,
    )
    network = parse_network_arg(str(file))
    into = tmp_path / "merged.safetensors"
    with pytest.raises(MeebsError, match=re.escape(f"{file}: {key} matches no layer")):
        streamed(base_file, [(network, read_network(file))], into, "fp16")
    assert not into.exists() and list(tmp_path.glob(".*")) == []


def test_ctrl_c_during_a_streamed_merge_leaves_no_file(tmp_path, monkeypatch):
    base_file = tiny_base_file(tmp_path, "fp16")
    network = parse_network_arg(str(trained_network(tmp_path, SPECS["loha"])))
    read, calls = TensorReader.read, []

    def interrupted(self, key):
        calls.append(key)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return read(self, key)

    monkeypatch.setattr(TensorReader, "read", interrupted)
    into = tmp_path / "merged.safetensors"
    with pytest.raises(KeyboardInterrupt):
        streamed(base_file, [(network, read_network(network.path))], into, "fp16")
    assert not into.exists() and list(tmp_path.glob(".*")) == []


def test_the_reader_reopens_the_file_so_its_pages_leave_memory(tmp_path, monkeypatch):
    """An mmap keeps every page it touched resident: the reader closes it every N bytes."""
    import meebs.models.single_file as single_file

    base_file = tiny_base_file(tmp_path, "fp16")
    monkeypatch.setattr(single_file, "_REOPEN_BYTES", 1 << 16)
    opened = []
    real_open = single_file.safe_open
    monkeypatch.setattr(
        single_file, "safe_open", lambda *a, **k: opened.append(1) or real_open(*a, **k)
    )
    base = open_single_file(base_file, None, config_dir=TINY_CONFIGS)
    expected = load_file(base_file)
    with base.reader() as reader:
        for key in sorted(expected):
            assert torch.equal(reader.read(key), expected[key])
    assert len(opened) > 3


# The memory bound on the full-size SD 1.5 architecture. The merge runs as its own process
# (entrypoint.py merge, the real command), started by a small wrapper that reports its
# children's peak resident memory (getrusage RUSAGE_CHILDREN: the whole process, Python,
# torch and diffusers included, and the pages of the base file it has mapped).
PEAK_RSS_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)
ENTRYPOINT = Path(__file__).parents[1] / "entrypoint.py"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sd15_single_file_merge_streams_within_twice_the_output_size(tmp_path, sd15_single_file):
    """One LoHA into the 2.1 GB fp16 SD 1.5 single file: peak RSS <= 2 x the output file.

    The in-memory merge peaked at 10.5 GiB on this (docs/networks.md); streamed, the
    process holds its imports, the network and a few tensors (1.4 GiB). The merge takes
    about a minute on two cores, mostly the LoHA deltas and the NaN/inf checks.
    """
    model, base, _ = sd15_single_file
    network_file = trained_network(tmp_path, SPECS["loha"], "loha", model=model, std=0.05)
    into = tmp_path / "merged.safetensors"
    argv = [sys.executable, str(ENTRYPOINT), "merge", f"{network_file}:0.8", "--model", str(base)]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_OF_CHILD, *argv, "--into", str(into)],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak = 1024 * int(result.stdout.split("peak_rss_kib")[-1])
    size = into.stat().st_size
    print(f"merge peak RSS {peak / 2**30:.2f} GiB, output {size / 2**30:.2f} GiB")
    assert size > 2 * 10**9
    assert peak <= 2 * size, f"peak RSS {peak:,} bytes > 2 x the output's {size:,}"
    # The merge landed where the network says, on the right LDM keys.
    modules = read_network(network_file)
    checks = {
        "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight": (
            "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
        ),
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight": (
            "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k"
        ),
        "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": (
            "lora_unet_down_blocks_1_resnets_0_conv1"
        ),
    }
    with safe_open(base, framework="pt") as before, safe_open(into, framework="pt") as after:
        for key, module_key in checks.items():
            weight = before.get_tensor(key).float()
            weight.add_(module_delta(module_key, modules[module_key], weight.shape), alpha=0.8)
            assert torch.equal(after.get_tensor(key), weight.half()), key
        vae = "first_stage_model.decoder.mid.attn_1.q.weight"
        assert torch.equal(after.get_tensor(vae), before.get_tensor(vae))
