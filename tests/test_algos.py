"""Every LyCORIS algorithm of the recipe schema, trained for real (issue 21).

For LoCon, LoKr (with a Kronecker factor), GLoRA, Diag-OFT (constraint and rescale),
full, (IA)^3, and DoRA on LoHA and on LoRA: a few steps of the real trainer on the tiny
base, with `ss_network_args` naming the algorithm and its options; every key on the
SD 1.5 layer AUTOMATIC1111/ComfyUI put it on, in the right shape; Ctrl-C + `train
--resume` gives the bytes of the run that never stopped; `generate` and `network.weights`
load the file. Plain LoHA and LoRA are covered by test_network, test_train and
test_recipes_resume.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from engine_runs import interrupt_at
from lycoris.utils import str_bool
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from sd15_naming import a1111_target, comfyui_accepts_text_encoder_key, reference_layers
from torch.overrides import TorchFunctionMode

from meebs.cli import main
from meebs.errors import MeebsError, RecipeError
from meebs.models.builtin_models import build_tiny
from meebs.network.algo_tensors import modules_of
from meebs.network.build import NetworkSpec, build_network
from meebs.network.load_file import load_network_file
from meebs.network.load_weights import load_network_weights
from meebs.network.loha_layer import layer_paths
from meebs.network.lokr_file import lokr_module
from meebs.network.save import save_network
from meebs.recipe.loading import load_recipe
from meebs.use.generate import Request, generate

pytestmark = pytest.mark.slow  # trains

REPO = Path(__file__).resolve().parent.parent
DEMO = "recipes/demo.yaml"

# name -> recipe network keys; the spec each gives is `spec_of(name)`.
CASES = {
    "locon": {"algo": "locon"},
    "lokr-factor": {"algo": "lokr", "factor": 4},
    "glora": {"algo": "glora"},
    "diag-oft": {"algo": "diag-oft", "constraint": 0.0001, "rescaled": True},
    "full": {"algo": "full"},
    "ia3": {"algo": "ia3"},
    "loha-dora": {"algo": "loha", "dora_wd": True},
    "lora-dora": {"algo": "lora", "dora_wd": True},
}
# What each file's ss_network_args says beyond algo, conv_dim, conv_alpha, use_tucker, preset.
EXTRA_ARGS = {
    "lokr-factor": {"factor": "4"},
    "diag-oft": {"constraint": "0.0001", "rescaled": "True"},
    "loha-dora": {"dora_wd": "True", "wd_on_output": "False"},
    "lora-dora": {"dora_wd": "True", "wd_on_output": "False"},
}
# A tensor every module of the algorithm has.
MARKERS = {
    "locon": "lora_down.weight",
    "lokr-factor": "lokr_w1",
    "glora": "a1.weight",
    "diag-oft": "oft_blocks",
    "full": "diff",
    "ia3": "on_input",
    "loha-dora": "dora_scale",
    "lora-dora": "dora_scale",
}
# One epoch of the one training image x 3 repeats: 3 steps, stopped after step 2.
STEPS, STOP_AT = 3, 2


def spec_of(name: str, **more) -> NetworkSpec:
    return NetworkSpec(**{**CASES[name], **more})


def overrides(name: str, data: Path, out: Path) -> list[str]:
    """The demo recipe cut to 1 image x 3 repeats x 1 epoch at 64 px, no reg images,
    samples or validation, on the random tiny base."""
    keys = [f"network.{key}={str(value).lower()}" for key, value in CASES[name].items()]
    return [
        "model.builtin=tiny",
        f"data.train_dir={data}",
        "data.reg_dir=null",
        "train.epochs=1",
        "train.batch_size=1",
        "train.learning_rate=1e-3",
        "sample.every_n_epochs=0",
        "validation.enabled=false",
        f"output.dir={out}",
        *keys,
    ]


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    """data/demo's first training image and caption, as `3_meeb`."""
    source = REPO / "data" / "demo" / "train" / "10_meeb"
    folder = tmp_path_factory.mktemp("algo-data") / "train"
    (folder / "3_meeb").mkdir(parents=True)
    image = sorted(source.glob("*.png"))[0]
    for twin in source.glob(image.stem + ".*"):
        shutil.copy(twin, folder / "3_meeb" / twin.name)
    return folder


@dataclass(frozen=True)
class Trained:
    name: str
    run: Path  # outputs/meebs_demo/RUN
    overrides: list[str]

    @property
    def file(self) -> Path:
        return self.run / "meebs_demo.safetensors"


@pytest.fixture(scope="module")
def trained(one_image, tmp_path_factory):
    """name -> its uninterrupted run, each trained once for the module (on first use)."""
    runs: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"whole-{name}")
            argv = overrides(name, one_image, out)
            _in_repo(lambda: main(["train", DEMO, *argv]), expect=0)
            (run,) = out.glob("meebs_demo/*")
            runs[name] = Trained(name, run, argv)
        return runs[name]

    return get


def _in_repo(call, expect: int) -> None:
    """Run `call` from the repository root (the recipe names data relative to it)."""
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        assert call() == expect
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------- (a) training


@pytest.mark.parametrize("name", CASES)
def test_trains_with_a_finite_loss_and_names_its_algorithm(name, trained):
    run = trained(name)
    manifest = json.loads((run.run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == STEPS
    assert manifest["epoch_losses"] and all(map(math.isfinite, manifest["epoch_losses"]))
    with safe_open(run.file, "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
        keys = list(f.keys())
    spec = spec_of(name)
    expected = {
        "algo": spec.algo,
        "conv_dim": "4",
        "conv_alpha": "1",
        "use_tucker": "False",
        "preset": "ia3" if name == "ia3" else "full",
        **EXTRA_ARGS.get(name, {}),
    }
    assert args == expected
    assert any(key.endswith("." + MARKERS[name]) for key in keys)
    # the steps moved the weights away from the network's init (seeded as train seeds it)
    unet, text_encoder = _tiny_parts()
    torch.manual_seed(42)
    init = build_network(unet, text_encoder, spec)
    start = {key: value.to(torch.float16) for key, value in init.state_dict().items()}
    init.restore()
    saved = load_file(run.file)
    assert saved.keys() == start.keys()
    assert any(not torch.equal(saved[key], start[key]) for key in saved)


def test_the_new_keys_at_their_defaults_write_todays_network_args():
    """A file trained by an earlier recipe keeps every byte of its metadata."""
    assert NetworkSpec().to_network_args() == {
        "algo": "loha",
        "conv_dim": "4",
        "conv_alpha": "1",
        "use_tucker": "False",
        "preset": "full",
    }
    args = NetworkSpec(algo="lokr", factor=8, decompose_both=True, use_scalar=True)
    assert args.to_network_args()["factor"] == "8"
    assert args.to_network_args()["decompose_both"] == args.to_network_args()["use_scalar"]
    assert "wd_on_output" not in args.to_network_args()


def test_dora_is_trained_and_recorded_per_input_column():
    """DoRA's magnitude per input column (lycoris' wd_on_out=False; its default is per
    output row): the layout AUTOMATIC1111's `apply_weight_decompose` assumes, written in
    ss_network_args as the kwarg lycoris' `create_network` reads."""
    spec = NetworkSpec(algo="lora", dora_wd=True)
    args = spec.to_network_args()
    assert (args["dora_wd"], args["wd_on_output"]) == ("True", "False")
    assert str_bool(args["wd_on_output"]) is False
    assert spec.lycoris_kwargs()["wd_on_out"] is False
    assert "wd_on_out" not in NetworkSpec(algo="lora").lycoris_kwargs()
    unet, text_encoder = _tiny_parts()
    network = build_network(unet, text_encoder, spec)
    for lora in network.loras:
        shape = tuple(lora.shape)  # the layer's weight
        assert lora.wd_on_out is False
        assert lora.dora_scale.shape == (1, shape[1], *[1] * (len(shape) - 2))
    network.restore()


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"algo": "glora", "dora_wd": True}, "network.dora_wd"),
        ({"algo": "loha", "factor": 8}, "network.factor"),
        ({"algo": "lora", "full_matrix": True}, "network.full_matrix"),
        ({"algo": "lokr", "constraint": 0.5}, "network.constraint"),
        ({"algo": "ia3", "use_tucker": True}, "network.use_tucker"),
        ({"algo": "full", "use_scalar": True}, "network.use_scalar"),
        ({"algo": "lokr", "full_matrix": True, "decompose_both": True}, "network.decompose_both"),
        ({"algo": "lokr", "factor": 0}, "network.factor"),
    ],
)
def test_an_option_the_algorithm_ignores_is_refused_naming_the_key(keys, named, tmp_path):
    with pytest.raises(RecipeError, match=named.replace(".", r"\.")):
        NetworkSpec(**keys)
    overrides_ = [f"network.{key}={str(value).lower()}" for key, value in keys.items()]
    with pytest.raises(RecipeError, match=named.replace(".", r"\.")):
        load_recipe(REPO / DEMO, overrides_)


def test_every_other_algorithm_takes_lycoris_own_forward():
    unet, text_encoder = _tiny_parts()
    network = build_network(unet, text_encoder, spec_of("lokr-factor"))
    assert layer_paths(network.loras, "fast") == {"lycoris": len(network.loras)}
    network.restore()
    network = build_network(unet, text_encoder, spec_of("loha-dora"))
    assert layer_paths(network.loras, "fast") == {"lycoris": len(network.loras)}


def test_plan_says_which_forward_each_module_takes(capsys):
    _in_repo(lambda: main(["plan", DEMO, "network.algo=lokr", "network.factor=4"]), expect=0)
    _in_repo(lambda: main(["plan", DEMO, "network.dora_wd=true"]), expect=0)
    out = " ".join(capsys.readouterr().out.split())
    assert "lokr on 95 modules (lycoris' own forward" in out
    assert "LoHA layers (train.loha_layer=fast): lycoris on 95 (DoRA and use_scalar" in out


# ---------------------------------------------------------------- (b) SD 1.5 keys

# Every algorithm on the SD 1.5 architecture, the plain LoKr and Diag-OFT too.
SD15_CASES = {
    **{name: spec_of(name) for name in CASES},
    "lokr": NetworkSpec(algo="lokr"),
    "lokr-both": NetworkSpec(algo="lokr", decompose_both=True, dora_wd=True),
    "diag-oft-plain": NetworkSpec(algo="diag-oft"),
    "loha": NetworkSpec(),
}


class _MetaStaysMeta(TorchFunctionMode):
    """`.cpu()` of a meta tensor is the tensor itself: lycoris' full and DoRA modules copy
    the layer's weight to the CPU, and the SD 1.5 parts here have no data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def sd15_meta():
    """A function: a fresh SD 1.5 UNet and text encoder on the meta device (no data)."""
    from conftest import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def make():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
        return unet.requires_grad_(False), text_encoder.requires_grad_(False)

    return make


def _change(factors: dict[str, tuple[int, ...]], layer: tuple[int, ...]) -> tuple[int, int]:
    """(out, in·k·k) of the change a module's tensors make, per algorithm."""
    f = factors
    flat = (layer[0], math.prod(layer[1:]))
    if "lora_up.weight" in f:
        return f["lora_up.weight"][0], math.prod(f["lora_down.weight"][1:])
    if "hada_w1_a" in f:
        assert f["hada_w1_a"][0] == f["hada_w2_a"][0] and f["hada_w1_b"] == f["hada_w2_b"]
        return f["hada_w1_a"][0], f["hada_w1_b"][1]
    if any(key.startswith("lokr_") for key in f):
        w1 = f.get("lokr_w1") or (f["lokr_w1_a"][0], f["lokr_w1_b"][1])
        w2 = f.get("lokr_w2") or (f["lokr_w2_a"][0], f["lokr_w2_b"][1])
        return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
    if "a1.weight" in f:  # W·A + B: A = a1 a2 (in x in), B = b1 b2
        assert f["a1.weight"][0] == f["a2.weight"][1] == layer[1]
        return f["b1.weight"][0], math.prod(f["b2.weight"][1:])
    if "oft_blocks" in f:  # block-diagonal rotation of the outputs
        blocks, size, same = f["oft_blocks"]
        assert size == same
        return blocks * size, flat[1]
    if "diff" in f:
        assert f["diff"] == layer and f.get("diff_b", (layer[0],)) == (layer[0],)
        return flat
    if "on_input" in f:  # one scale per output (or input) channel
        assert f["weight"] in ((layer[0],), (layer[1],))
        return flat
    raise AssertionError(f"unknown module tensors {sorted(f)}")


@pytest.mark.parametrize("name", SD15_CASES)
def test_every_key_lands_on_an_sd15_layer_of_its_shape(name, sd15_meta):
    unet, text_encoder = sd15_meta()
    torch.manual_seed(0)
    with _MetaStaysMeta():
        network = build_network(unet, text_encoder, SD15_CASES[name])
        state = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    layers = {**reference_layers("sd15_ldm_unet_weights.txt")}
    layers.update(reference_layers("sd15_text_encoder_linear_weights.txt"))
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in state.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = shape
    problems = []
    for module, factors in sorted(modules.items()):
        target = a1111_target(module)
        layer = layers.get(target)
        if layer is None:
            problems.append(f"{module}: no SD 1.5 layer {target}")
            continue
        flat = (layer[0], math.prod(layer[1:]))
        if _change(factors, layer) != flat:
            problems.append(f"{module}: {factors} is no change of {layer}")
        dora = factors.get("dora_scale")
        # per input column (wd_on_output False), the layout A1111's DoRA code assumes
        if dora is not None and (dora[:2], math.prod(dora)) != ((1, layer[1]), layer[1]):
            problems.append(f"{module}: dora_scale {dora} is not one per input of {layer}")
        if module.startswith("lora_te") and not comfyui_accepts_text_encoder_key(module):
            problems.append(f"{module}: ComfyUI drops it")
    assert problems == []
    targets = [a1111_target(module) for module in modules]
    assert len(set(targets)) == len(targets)
    unet_count = sum(module.startswith("lora_unet_") for module in modules)
    if name == "ia3":
        # to_k, to_v of both attentions and ff.net.2 in 16 transformer blocks; k, v, fc2 x 12
        assert (unet_count, len(modules) - unet_count) == (80, 36)
        on_input = {lora.lora_name for lora in network.loras if lora.train_input}
        assert on_input == {m for m in modules if m.endswith(("_ff_net_2", "_mlp_fc2"))}
    else:
        assert (unet_count, len(modules) - unet_count) == (282, 72)


@pytest.mark.parametrize("name", ["lokr", "lokr-factor", "lokr-both", "lokr-tucker"])
def test_each_lokr_module_is_built_again_from_its_own_tensors_on_sd15(name, sd15_meta):
    """`load_network_file` builds LoKr modules itself: lycoris 4.1.3's loader fails on
    the 1920-input 3x3 convolution of up_blocks.1 (default factor) and on every Tucker
    3x3 convolution. Here each module of the SD 1.5 network is built again from its
    tensors' shapes, as the loader does, and gets the same tensors and scale."""
    spec = SD15_CASES.get(name) or NetworkSpec(algo="lokr", use_tucker=True)
    unet, text_encoder = sd15_meta()
    with _MetaStaysMeta():
        network = build_network(unet, text_encoder, spec)
        for lora in network.loras:
            tensors = lora.state_dict()
            again = lokr_module(lora.lora_name, lora.org_module[0], tensors, 1.0)
            shapes = {key: value.shape for key, value in again.state_dict().items()}
            assert shapes == {key: value.shape for key, value in tensors.items()}
            assert again.scale == lora.scale, lora.lora_name


# ---------------------------------------------------------------- (c) resume


@pytest.mark.parametrize("name", CASES)
def test_stop_and_resume_gives_the_bytes_of_the_run_that_never_stopped(
    name, trained, one_image, tmp_path, monkeypatch
):
    whole = trained(name)
    argv = overrides(name, one_image, tmp_path)
    with monkeypatch.context() as patch:
        interrupt_at(patch, STOP_AT)
        _in_repo(lambda: main(["train", DEMO, *argv]), expect=130)
    (run,) = tmp_path.glob("meebs_demo/*")
    assert (run / "resume.state").exists()
    _in_repo(lambda: main(["train", "--resume", str(run)]), expect=0)
    assert (run / "meebs_demo.safetensors").read_bytes() == whole.file.read_bytes()
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        manifest["epoch_losses"]
        == json.loads((whole.run / "manifest.json").read_text())["epoch_losses"]
    )


# ---------------------------------------------------------------- (d) loading


@pytest.mark.parametrize("name", CASES)
def test_generate_draws_with_the_file(name, trained, tmp_path):
    run = trained(name)
    console = Console(file=io.StringIO(), width=400)
    request = Request(
        prompt="a drawing of meeb <lyco:meebs_demo:1>",
        seed=1,
        steps=2,
        outputs=run.run.parent.parent,
        out=tmp_path,
    )
    (png,) = generate(request, console)
    assert png.stat().st_size > 0


def _tiny_parts():
    base = build_tiny()
    return base.unet, base.text_encoder


@pytest.mark.parametrize("name", CASES)
def test_network_weights_loads_the_file_into_a_new_network(name, trained):
    """`network.weights`: the recipe's network takes every tensor of the file."""
    run = trained(name)
    unet, text_encoder = _tiny_parts()
    torch.manual_seed(1)
    network = build_network(unet, text_encoder, spec_of(name))
    load_network_weights(network, run.file)
    saved = load_file(run.file)
    state = network.state_dict()
    for key, tensor in saved.items():
        if name == "full":  # `diff` comes back as (diff + weight) - weight, in float32
            torch.testing.assert_close(state[key].to(tensor.dtype), tensor, rtol=1e-3, atol=1e-6)
        else:
            assert torch.equal(state[key].to(tensor.dtype), tensor), key
    network.restore()


@pytest.mark.parametrize(
    "keys",
    [
        {"dim": 2, "conv_dim": 2},
        {"dim": 2, "factor": 4},
        {"dim": 2, "conv_dim": 2, "factor": 8},
        {"dim": 2, "factor": 16},
        {"dim": 2, "conv_dim": 2, "decompose_both": True},
        {"dim": 2, "conv_dim": 2, "factor": 4, "decompose_both": True, "dora_wd": True},
        {"dim": 2, "conv_dim": 2, "use_tucker": True},
    ],
    ids=str,
)
def test_a_lokr_file_loads_for_generate_as_it_was_trained(keys, tmp_path):
    """lycoris 4.1.3's loader guesses a LoKr module's factor from its shapes and fails
    on the tiny base's 4-channel convolutions at conv dim 2 and on every layer at factor
    16 (`meebs.network.lokr_file`); the file must draw what the trained network draws."""
    unet, text_encoder = _tiny_parts()
    torch.manual_seed(0)
    network = build_network(unet, text_encoder, NetworkSpec(algo="lokr", **keys))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.1)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 6, 32))
    with torch.no_grad():
        trained = unet(*inputs).sample
    save_network(network, tmp_path / "lokr.safetensors", {}, torch.float32)
    network.restore()
    loaded = load_network_file(tmp_path / "lokr.safetensors", unet, text_encoder)
    assert len(loaded.loras) == len(network.loras)
    with torch.no_grad():
        torch.testing.assert_close(unet(*inputs).sample, trained)
    kept = {key: tuple(value.shape) for key, value in loaded.state_dict().items()}
    assert modules_of(kept).keys() == modules_of(network.state_dict()).keys()
    loaded.restore()


def test_a_file_of_another_algorithm_does_not_fit(trained):
    unet, text_encoder = _tiny_parts()
    network = build_network(unet, text_encoder, NetworkSpec(algo="loha"))
    with pytest.raises(MeebsError, match="does not fit this network"):
        load_network_weights(network, trained("lokr-factor").file)
    network.restore()
