"""Every `network.algo`'s file, read back (issue 21, item 3, the file side).

Each algorithm's module is built with lycoris-lora's own classes on a small Linear, a
1x1 and a 3x3 conv, every tensor random and non-zero, saved in kohya/LyCORIS naming and
read through the checks every network file gets (`load_network_tensors`). Our change
(`module_delta`, with the layer's weight where the algorithm needs it, and `bias_delta`)
applied to random input must give what lycoris' own forward adds to the layer's output
at multiplier 1, within fp32 rounding. lycoris' forward is the reference, not its
`get_diff_weight`: that one scales LoHA and LoKr by (alpha / rank) twice.

Files that do not rebuild their layer (wrong factors, huge declared shapes, a tensor of no
algorithm) are refused in one line before anything is computed or allocated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lycoris.kohya import LycorisNetworkKohya
from lycoris.modules import (
    DiagOFTModule,
    FullModule,
    GLoRAModule,
    IA3Module,
    LoConModule,
    LohaModule,
    LokrModule,
)
from safetensors.torch import load_file, save_file
from torch import nn

from meebs.errors import MeebsError
from meebs.models.builtin_models import build_tiny
from meebs.network.algo_tensors import misfit, modules_of, needs_base
from meebs.network.apply import apply_network, remove_network
from meebs.network.build import NetworkSpec, apply_sd15_preset, build_network, lycoris_text_encoder
from meebs.network.deltas import bias_delta, module_delta
from meebs.network.load_weights import load_network_weights
from meebs.network.network_file import load_network_tensors, read_network_header
from meebs.network.resume_tensors import load_train_state, train_state
from meebs.network.save import save_network
from meebs.use.inspect import algo_args

NAME = "lora_unet_test"
# Not square, and 48 = 6 x 8, 32 = 4 x 8: LoKr splits both, Diag-OFT takes blocks of 8.
IN, OUT = 32, 48
LAYERS = {
    "linear": lambda: nn.Linear(IN, OUT),
    "conv1x1": lambda: nn.Conv2d(IN, OUT, 1),
    "conv3x3": lambda: nn.Conv2d(IN, OUT, 3, padding=1),
}
# (lycoris class, its arguments): every kind of file each algo writes. alpha 3 over rank
# 2 is a scale of 1.5, so a scale applied twice (or not at all) shows.
CASES = {
    "lora": (LoConModule, {"lora_dim": 2, "alpha": 3}),
    "lora-tucker": (LoConModule, {"lora_dim": 2, "alpha": 3, "use_tucker": True}),
    "lora-scalar": (LoConModule, {"lora_dim": 2, "alpha": 3, "use_scalar": True}),
    "lora-dora": (LoConModule, {"lora_dim": 2, "alpha": 3, "weight_decompose": True}),
    "lora-dora-in": (
        LoConModule,
        {"lora_dim": 2, "alpha": 3, "weight_decompose": True, "wd_on_out": False},
    ),
    "loha": (LohaModule, {"lora_dim": 2, "alpha": 3}),
    "loha-tucker": (LohaModule, {"lora_dim": 2, "alpha": 3, "use_tucker": True}),
    "loha-dora": (LohaModule, {"lora_dim": 2, "alpha": 3, "weight_decompose": True}),
    "loha-dora-in": (
        LohaModule,
        {"lora_dim": 2, "alpha": 3, "weight_decompose": True, "wd_on_out": False},
    ),
    "lokr": (LokrModule, {"lora_dim": 2, "alpha": 3}),
    "lokr-both": (LokrModule, {"lora_dim": 2, "alpha": 3, "decompose_both": True}),
    "lokr-full": (LokrModule, {"lora_dim": 2, "alpha": 3, "full_matrix": True}),
    "lokr-tucker": (LokrModule, {"lora_dim": 2, "alpha": 3, "use_tucker": True}),
    "lokr-factor": (LokrModule, {"lora_dim": 2, "alpha": 3, "factor": 4}),
    "lokr-scalar": (LokrModule, {"lora_dim": 2, "alpha": 3, "use_scalar": True}),
    "lokr-dora": (LokrModule, {"lora_dim": 2, "alpha": 3, "weight_decompose": True}),
    "lokr-dora-in": (
        LokrModule,
        {"lora_dim": 2, "alpha": 3, "weight_decompose": True, "wd_on_out": False},
    ),
    "glora": (GLoRAModule, {"lora_dim": 2, "alpha": 3}),
    "glora-scalar": (GLoRAModule, {"lora_dim": 2, "alpha": 3, "use_scalar": True}),
    "diag-oft": (DiagOFTModule, {"lora_dim": 8}),
    "diag-oft-constrained": (DiagOFTModule, {"lora_dim": 8, "constraint": 1e-3}),
    "diag-oft-rescaled": (DiagOFTModule, {"lora_dim": 8, "rescaled": True}),
    "full": (FullModule, {}),
    "ia3": (IA3Module, {}),
    "ia3-on-input": (IA3Module, {"train_on_input": True}),
}


@pytest.fixture(autouse=True)
def eager_lycoris(monkeypatch):
    """lycoris' eager kernels instead of torch.compile per layer shape (see test_merge)."""
    from lycoris.kernels import dispatch

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.setattr(dispatch, "_available", None)


def built(case: str, layer_kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the layer, lycoris' module on it): every tensor random, multiplier 1, rebuild mode."""
    torch.manual_seed(seed)
    layer = LAYERS[layer_kind]()
    module_class, arguments = CASES[case]
    module = module_class(NAME, layer, multiplier=1.0, bypass_mode=False, **arguments)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name == "scalar":
                parameter.fill_(0.7)
            elif name == "dora_scale":
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))
            elif name == "rescale":
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.2)
    if isinstance(module, FullModule):  # its file holds diff = weight - the layer's
        module.apply_to()
        module.restore()
    return layer, module.eval()


def saved(module: nn.Module, folder: Path, dtype=torch.float32) -> Path:
    """The module's tensors in a network file, as kohya's save writes them."""
    tensors = {
        f"{NAME}.{key}": value.detach().to(dtype if value.is_floating_point() else value.dtype)
        for key, value in module.state_dict().items()
    }
    path = folder / "net.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, path)
    return path


def inputs(layer: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, IN) if isinstance(layer, nn.Linear) else torch.randn(2, IN, 5, 5)


def applied(layer: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=layer.padding)


@pytest.mark.parametrize("layer_kind", list(LAYERS))
@pytest.mark.parametrize("case", list(CASES))
def test_our_change_is_lycoris_change(tmp_path, case, layer_kind):
    if case.endswith("tucker") and layer_kind != "conv3x3":
        pytest.skip("lycoris uses Tucker on k x k kernels only")
    layer, module = built(case, layer_kind)
    x = inputs(layer)
    with torch.no_grad():
        expected = module(x) - layer(x)
    tensors = modules_of(load_network_tensors(saved(module, tmp_path)))[NAME]
    base = layer.weight.detach().clone()
    delta = module_delta(NAME, tensors, layer.weight.shape, base=base)
    bias = layer.bias.shape if layer.bias is not None else None
    change = bias_delta(NAME, tensors, bias)
    got = applied(layer, x, delta, change)
    assert expected.abs().max() > 1e-3  # a change that is there to compare
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(base, layer.weight)  # the base weight is read, never written


@pytest.mark.parametrize("case", ["lokr", "lokr-tucker", "glora", "diag-oft-rescaled", "ia3"])
def test_an_fp16_file_changes_what_lycoris_changes_with_its_fp16_values(tmp_path, case):
    """The file's own precision: the change is computed in fp32 from the rounded values."""
    layer, module = built(case, "conv3x3")
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.half().float())
    tensors = modules_of(load_network_tensors(saved(module, tmp_path, torch.float16)))[NAME]
    assert all(value.dtype != torch.float32 for value in tensors.values())
    x = inputs(layer)
    with torch.no_grad():
        expected = module(x) - layer(x)
    delta = module_delta(NAME, tensors, layer.weight.shape, base=layer.weight.detach())
    got = applied(layer, x, delta, None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def a1111_merged(weight: torch.Tensor, updown: torch.Tensor, dora_scale: torch.Tensor):
    """What AUTOMATIC1111 v1.10 makes of a DoRA module at multiplier 1, restated from its
    extensions-builtin/Lora/network.py: `finalize_updown` scales the algorithm's change by
    alpha / r, then `apply_weight_decompose` normalises W + dW per input column (always,
    whatever dora_scale's shape) and the layer gets W + (that - W)."""
    merged = updown + weight
    norm = (
        merged.transpose(0, 1)
        .reshape(merged.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(merged.shape[1], *[1] * (weight.dim() - 1))
        .transpose(0, 1)
    )
    return weight + (merged * (dora_scale / norm) - weight)


@pytest.mark.parametrize("layer_kind", list(LAYERS))
@pytest.mark.parametrize("case", ["lora-dora-in", "loha-dora-in", "lokr-dora-in"])
def test_a_per_input_dora_file_merges_as_automatic1111_applies_it(tmp_path, case, layer_kind):
    """meebs' DoRA layout (magnitude per input column, [1, in(, 1, 1)]) is the one A1111's
    per-column norm is right for: W + our delta is A1111's merged weight."""
    layer, module = built(case, layer_kind)
    tensors = modules_of(load_network_tensors(saved(module, tmp_path)))[NAME]
    dora_scale = tensors["dora_scale"]
    assert dora_scale.shape == (1, IN, *[1] * (layer.weight.dim() - 2))
    weight = layer.weight.detach().clone()
    ours = weight + module_delta(NAME, tensors, weight.shape, base=weight)
    plain = {key: value for key, value in tensors.items() if key != "dora_scale"}
    updown = module_delta(NAME, plain, weight.shape)  # the algorithm's change, scaled
    a1111 = a1111_merged(weight, updown, dora_scale)
    assert (a1111 - weight).abs().max() > 1e-3
    torch.testing.assert_close(ours, a1111, rtol=1e-5, atol=1e-6)


def test_a1111_would_misapply_a_per_output_dora_file(tmp_path):
    """lycoris' default layout ([out, 1]): A1111's per-column norm broadcasts it into
    another weight (why meebs trains per input)."""
    layer, module = built("lora-dora", "linear")
    tensors = modules_of(load_network_tensors(saved(module, tmp_path)))[NAME]
    weight = layer.weight.detach().clone()
    ours = weight + module_delta(NAME, tensors, weight.shape, base=weight)
    plain = {key: value for key, value in tensors.items() if key != "dora_scale"}
    updown = module_delta(NAME, plain, weight.shape)
    a1111 = a1111_merged(weight, updown, tensors["dora_scale"])
    assert (ours - a1111).abs().max() > 1e-2


def test_which_changes_need_the_base_weight(tmp_path):
    expected = {
        "lora": False,
        "loha": False,
        "lokr": False,
        "full": False,
        "glora": True,
        "diag-oft": True,
        "ia3": True,
        "lora-dora": True,
        "loha-dora": True,
        "lokr-dora": True,
    }
    for case, needed in expected.items():
        _, module = built(case, "linear")
        assert needs_base(module.state_dict()) is needed, case
        if needed:
            with pytest.raises(MeebsError, match="computed from the layer's weight"):
                module_delta(NAME, dict(module.state_dict()), torch.Size((OUT, IN)))


def test_every_file_is_described_by_its_header_alone(tmp_path):
    """read_network_header accepts each algo's file (inspect's and generate's first step)."""
    for case in CASES:
        for layer_kind in LAYERS:
            if case.endswith("tucker") and layer_kind != "conv3x3":
                continue
            layer, module = built(case, layer_kind)
            path = saved(module, tmp_path)
            header = read_network_header(path)
            factors = modules_of(header.shapes)[NAME]
            assert misfit(NAME, factors, tuple(layer.weight.shape)) is None, (case, layer_kind)
            path.unlink()


# ------------------------------------------------------------------------ refused


def _lokr(**shapes) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, 0.1) for name, shape in shapes.items()}


# name: (tensors of module NAME, the layer's weight shape, what the one line says)
REFUSED = {
    "lokr-wrong-kron": (
        _lokr(lokr_w1=(6, 4), lokr_w2=(8, 9)),
        (OUT, IN),
        r"rebuild a \[48, 36\] delta, the layer's weight is \[48, 32\]",
    ),
    "lokr-huge": (  # a 16 GiB kron from 512 KiB of factors: refused, never allocated
        _lokr(lokr_w1=(65536, 1), lokr_w2=(1, 65536)),
        (OUT, IN),
        r"rebuild a \[65536, 65536\] delta",
    ),
    "lokr-do-not-multiply": (
        _lokr(lokr_w1_a=(6, 2), lokr_w1_b=(3, 4), lokr_w2=(8, 8)),
        (OUT, IN),
        r"lokr_w1_a \[6, 2\] @ lokr_w1_b \[3, 4\] do not multiply",
    ),
    "lokr-ranks-differ": (
        _lokr(lokr_w1_a=(6, 2), lokr_w1_b=(2, 4), lokr_w2_a=(8, 3), lokr_w2_b=(3, 8)),
        (OUT, IN),
        r"differ in rank",
    ),
    "lokr-both-halves": (
        _lokr(lokr_w1=(6, 4), lokr_w1_a=(6, 2), lokr_w2=(8, 8)),
        (OUT, IN),
        r"both lokr_w1 and lokr_w1_a",
    ),
    "lokr-half-missing": (_lokr(lokr_w1=(6, 4)), (OUT, IN), r"lokr_w2 \(or lokr_w2_a and"),
    "glora-missing": (
        _lokr(**{"a1.weight": (2, IN), "a2.weight": (IN, 2), "b1.weight": (2, IN)}),
        (OUT, IN),
        r"b2\.weight missing",
    ),
    "glora-old-layout": (  # b2 @ b1 + W @ a2 @ a1, which lycoris no longer writes
        _lokr(
            **{
                "a1.weight": (2, IN),
                "a2.weight": (IN, 2),
                "b1.weight": (2, IN),
                "b2.weight": (OUT, 2),
            }
        ),
        (OUT, IN),
        r"do not join as a1 \[in, r\]",
    ),
    "glora-huge": (
        _lokr(
            **{
                "a1.weight": (65536, 1),
                "a2.weight": (1, 65536),
                "b1.weight": (65536, 1),
                "b2.weight": (1, 65536),
            }
        ),
        (OUT, IN),
        r"rebuild a \[65536, 65536\] delta",
    ),
    "oft-not-square": (_lokr(oft_blocks=(6, 8, 7)), (OUT, IN), r"not a stack of square blocks"),
    "oft-other-size": (_lokr(oft_blocks=(8, 8, 8)), (OUT, IN), r"8 blocks of 8 rotate 64"),
    "oft-rescale": (
        _lokr(oft_blocks=(6, 8, 8), rescale=(OUT,)),
        (OUT, IN),
        r"its rescale \[48\] is not \[48, 1\]",
    ),
    "ia3-no-on-input": (_lokr(weight=(OUT,)), (OUT, IN), r"on_input missing"),
    "ia3-other-size": (
        {"weight": torch.ones(40), "on_input": torch.tensor(0)},
        (OUT, IN),
        r"scales neither the 48 outputs nor the inputs",
    ),
    "ia3-on-input-wrong": (
        {"weight": torch.ones(OUT), "on_input": torch.tensor(1)},
        (OUT, IN),
        r"48 numbers for the layer's 32 inputs",
    ),
    "full-other-size": (_lokr(diff=(OUT, 16)), (OUT, IN), r"rebuild a \[48, 16\] delta"),
    "full-bias": (_lokr(diff=(OUT, IN), diff_b=(IN,)), (OUT, IN), r"diff_b \[32\] is not the"),
    "dora-other-size": (
        _lokr(**{"lora_up.weight": (OUT, 2), "lora_down.weight": (2, IN), "dora_scale": (40, 1)}),
        (OUT, IN),
        r"dora_scale \[40, 1\] is not one number per output or input",
    ),
    "dora-on-glora": (
        _lokr(
            **{
                "a1.weight": (IN, 2),
                "a2.weight": (2, IN),
                "b1.weight": (OUT, 2),
                "b2.weight": (2, IN),
                "dora_scale": (OUT, 1),
            }
        ),
        (OUT, IN),
        r"lycoris has no DoRA for GLoRA",
    ),
    "unknown-suffix": (
        _lokr(lokr_w1=(6, 4), lokr_w2=(8, 8), lokr_t1=(2, 2, 1, 1)),
        (OUT, IN),
        r"\.lokr_t1: not a tensor of a LoKr module",
    ),
    "mixed": (
        _lokr(lokr_w1=(6, 4), lokr_w2=(8, 8), hada_w1_a=(OUT, 2)),
        (OUT, IN),
        r"mixes LoHA and LoKr tensors",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_module_that_does_not_rebuild_its_layer_is_one_line(name):
    tensors, shape, expected = REFUSED[name]
    base = torch.ones(shape)
    with pytest.raises(MeebsError, match=expected) as error:
        module_delta(NAME, tensors, torch.Size(shape), base=base)
    assert "\n" not in str(error.value) and NAME in str(error.value)


def test_a_diff_b_for_a_layer_without_bias_is_one_line():
    with pytest.raises(MeebsError, match="changes a bias this layer does not have"):
        bias_delta(NAME, {"diff": torch.ones(OUT, IN), "diff_b": torch.ones(OUT)}, None)


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        (_lokr(lokr_w1_a=(6, 2), lokr_w1_b=(3, 4), lokr_w2=(8, 8)), r"do not multiply"),
        (_lokr(lokr_w1=(6, 4), lokr_w2=(8, 8), foo=(3,)), r"\.foo: not a tensor of a LoKr"),
        ({"foo": torch.ones(3)}, r"\.foo: not a tensor of any LoRA/LyCORIS module"),
        (_lokr(lokr_w1=(6, 4), lokr_w2=(8, 8), hada_w1_a=(OUT, 2)), r"mixes LoHA and LoKr"),
        (_lokr(oft_blocks=(6, 8, 8), rescale=(40, 1)), r"rescale \[40, 1\] is not one number"),
        ({"weight": torch.ones(OUT), "on_input": torch.ones(2)}, r"on_input \[2\] is not one"),
        (_lokr(dora_scale=(OUT, 1)), r"has dora_scale and no weights"),
        (
            {k: torch.full(v, 1e20) for k, v in {"lokr_w1": (6, 4), "lokr_w2": (8, 8)}.items()},
            r"rebuild a change of up to 1e\+40, past float32",
        ),
    ],
)
def test_a_wrong_file_is_refused_from_its_header_in_one_line(tmp_path, tensors, expected):
    path = tmp_path / "net.safetensors"
    right = {f"lora_unet_right.{key}": torch.ones(2, 2) for key in ("lokr_w1", "lokr_w2")}
    save_file({**right, **{f"{NAME}.{key}": value for key, value in tensors.items()}}, path)
    with pytest.raises(MeebsError, match=expected) as error:
        load_network_tensors(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_an_integer_on_input_is_read(tmp_path):
    """lycoris keeps IA3's on_input as an int64; a file may hold it so."""
    layer, module = built("ia3-on-input", "linear")
    path = saved(module, tmp_path)
    assert read_network_header(path).dtypes[f"{NAME}.on_input"] == "I64"
    tensors = modules_of(load_network_tensors(path))[NAME]
    delta = module_delta(NAME, tensors, layer.weight.shape, base=layer.weight.detach())
    torch.testing.assert_close(delta, layer.weight.detach() * module.weight.detach())


# ------------------------------------------------------------------------ DoRA networks


def _tiny_outputs(base) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny UNet's and text encoder's outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(1)
    config = base.unet.config
    size = config.sample_size
    sample = torch.randn(2, config.in_channels, size, size, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    ids = torch.randint(0, base.text_encoder.config.vocab_size, (2, 77), generator=generator)
    with torch.no_grad():
        unet = base.unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        return unet, base.text_encoder(ids).last_hidden_state


def _perturbed(network) -> None:
    """Every factor non-zero and every magnitude off the layer's own norm, as training
    would leave them."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            noise = torch.rand(parameter.shape, generator=generator)
            if name.endswith("dora_scale"):
                parameter.mul_(0.5 + noise)
            else:
                parameter.copy_((noise - 0.5) * 0.6)


def _lycoris_default_dora(base, algo: str):
    """A DoRA network as lycoris trains it by default (magnitude per output row); the
    dims of NetworkSpec's defaults (lycoris 4.1.3's loader misreads the factors of some
    LoKr layers of the tiny base at dim 2, DoRA or not)."""
    apply_sd15_preset()
    kwargs = {"lora_dim": 4, "alpha": 1, "conv_lora_dim": 4, "conv_alpha": 1}
    text_encoder = lycoris_text_encoder(base.text_encoder)
    network = LycorisNetworkKohya(
        text_encoder, base.unet, network_module=algo, weight_decompose=True, **kwargs
    )
    network.apply_to(text_encoder, base.unet, apply_text_encoder=True, apply_unet=True)
    return network


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("axis", ["input", "output"])
def test_generate_applies_a_dora_file_as_the_trained_network_does(tmp_path, algo, axis):
    """`generate`'s loader (`apply_network`) on a fresh base gives the outputs of the
    network that was saved: meebs' DoRA (per input column, `wd_on_output: False`) and
    lycoris' default (per output row) alike."""
    trained = build_tiny()
    torch.manual_seed(0)
    if axis == "input":
        spec = NetworkSpec(algo=algo, dora_wd=True)
        assert spec.to_network_args()["wd_on_output"] == "False"
        network = build_network(trained.unet, trained.text_encoder, spec)
    else:
        network = _lycoris_default_dora(trained, algo)
    _perturbed(network)
    assert network.loras and all(hasattr(lora, "dora_scale") for lora in network.loras)
    for lora in network.loras:  # [1, in(, 1, 1)] per input, [out, 1(, 1, 1)] per output
        assert (lora.dora_scale.shape[0] == 1) is (axis == "input"), lora.lora_name
    path = tmp_path / "dora.safetensors"
    save_network(network, path, {}, torch.float32)
    expected = _tiny_outputs(trained)

    fresh = build_tiny()
    before = _tiny_outputs(fresh)
    assert (before[0] - expected[0]).abs().max() > 1e-3
    assert (before[1] - expected[1]).abs().max() > 1e-3
    loaded = apply_network(path, fresh, te=1.0, unet=1.0)
    assert {lora.lora_name for lora in loaded.loras} == {lora.lora_name for lora in network.loras}
    for got, want in zip(_tiny_outputs(fresh), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    remove_network(loaded)
    for got, want in zip(_tiny_outputs(fresh), before, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_network_weights_takes_a_per_input_dora_file_and_explains_a_per_output_one(tmp_path):
    spec = NetworkSpec(algo="lora", dora_wd=True)
    source = build_tiny()
    torch.manual_seed(0)
    network = build_network(source.unet, source.text_encoder, spec)
    _perturbed(network)
    ours = tmp_path / "ours.safetensors"
    save_network(network, ours, {}, torch.float32)
    default = _lycoris_default_dora(build_tiny(), "lora")
    _perturbed(default)
    theirs = tmp_path / "theirs.safetensors"
    save_network(default, theirs, {}, torch.float32)

    target = build_tiny()
    torch.manual_seed(1)
    fresh = build_network(target.unet, target.text_encoder, spec)
    load_network_weights(fresh, ours)
    stored, state = load_file(ours), fresh.state_dict()
    assert all(torch.equal(state[key], value) for key, value in stored.items())
    with pytest.raises(MeebsError, match=r"per output row .*wd_on_output.* per input column"):
        load_network_weights(fresh, theirs)
    # a resume.state of such a network (a run from before meebs trained per input)
    with pytest.raises(MeebsError, match=r"dora_scale is \[\d+, 1.*trained DoRA per input"):
        load_train_state(fresh, train_state(default))


@pytest.mark.parametrize(
    ("case", "axis"),
    [
        ("lora-dora-in", "per input column (wd_on_output False)"),
        ("lora-dora", "per output row (wd_on_output True: AUTOMATIC1111 misapplies it)"),
    ],
)
def test_inspect_says_which_axis_a_dora_magnitude_is_on(tmp_path, case, axis):
    _, module = built(case, "conv3x3")
    factors = modules_of(read_network_header(saved(module, tmp_path)).shapes)
    assert algo_args(factors, {}) == f"DoRA (dora_wd) on 1 of 1, magnitude {axis}"
