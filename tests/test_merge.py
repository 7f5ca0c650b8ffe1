"""`merge` on the tiny model: merged weights give what the network gives at run time.

The reference is lycoris' own forward (`load_network_file` at multiplier W), the merge is
our delta code (`meebs.deltas`): two independent implementations of the same formula.
The tiny model has every layer kind SD 1.5 has: Linear, 1x1 conv (proj_in/out) and 3x3
convs, in both the UNet and the text encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.merge import merge, merge_into, parse_network_arg, pin_path, read_network
from meebs.models import build_tiny, load_base_model
from meebs.network import NetworkSpec, build_network, load_network_file, save_network
from meebs.sampling import SamplePrompt, generate_samples

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


def trained_network(tmp_path, spec: NetworkSpec, name: str = "net"):
    """A network file whose every factor is random, as after training (init has w2_a = 0)."""
    model = build_tiny()
    torch.manual_seed(1)
    network = build_network(model.unet, model.text_encoder, spec)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.3)
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
