"""Network files from strangers (issue 19, part 4): inspect, generate, merge and
network.weights each get a file that is wrong in one way, through the command line.

Each wrong file is refused with one line that names the file and, where there is one,
the key, before any image or checkpoint is written; A1111 and ComfyUI would apply most of
them without a word (transposed factors reshaped, NaN drawn black, one layer applied twice
under `lora_te_` and `lora_te1_`). A file that is unusual but right (F64 values, an
integer alphas, megabytes of metadata) draws exactly what the original draws.

The tiny base, 1 sampling step, 64 px: the files are built once for the module.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from random_networks import random_network
from rich.console import Console
from safetensors.torch import load_file, save_file

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.models.builtin_models import build_tiny
from meebs.network.build import NetworkSpec, build_network
from meebs.network.load_weights import load_network_weights
from meebs.network.save import network_state_dict, save_network
from meebs.use.inspect import inspect_file

REPO = Path(__file__).resolve().parent.parent
# A 64 x 32 Linear in the tiny model: not square, so a transposed change has another shape.
FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TINY_RECIPE = json.dumps({"model": {"builtin": "tiny"}, "output": {"name": "good"}})
MIB = 2**20


def _dtype(key: str, dtype: torch.dtype):
    return lambda t, lora, m: t.update({key: t[key].to(dtype)})


def _transposed(t: dict, up: str, down: str) -> None:
    """Factors whose product is the transposed change: the right element count."""
    t[up], t[down] = t[down].T.contiguous(), t[up].T.contiguous()


def _set(key: str, value: torch.Tensor):
    return lambda t, lora, m: t.update({key: value})


def _sdxl(t: dict, lora, m) -> None:
    for key in [key for key in t if key.startswith("lora_te_")]:
        t[key.replace("lora_te_", "lora_te1_")] = t.pop(key)


def _twice(t: dict, lora, m) -> None:
    for key in [key for key in t if key.startswith(FC1 + ".")]:
        t[key.replace("lora_te_", "lora_te1_")] = t[key].clone()


def _sd2(t: dict, lora, m) -> None:
    for half in ("w1", "w2"):  # the UNet reads a 1024-wide text context in SD 2.x
        t[f"{ATTN2_K}.hada_{half}_b"] = torch.full((4, 1024), 0.1, dtype=torch.float16)


def _unknown_layer(t: dict, lora, m) -> None:
    for key in [key for key in t if key.startswith(FC1 + ".")]:
        t[key.replace(FC1, "lora_unet_not_a_layer")] = t[key].clone()


def _lora_transposed(t: dict, lora: dict, m) -> None:
    t.clear()
    t.update(lora)
    _transposed(t, f"{FC1}.lora_up.weight", f"{FC1}.lora_down.weight")


def _lokr_huge(t: dict, lora, m) -> None:
    """fc1 as a LoKr whose Kronecker product would be 65536 x 65536 (16 GiB in fp32)."""
    for key in [key for key in t if key.startswith(FC1 + ".")]:
        del t[key]
    t[f"{FC1}.lokr_w1"] = torch.full((65536, 1), 0.01, dtype=torch.float16)
    t[f"{FC1}.lokr_w2"] = torch.full((1, 65536), 0.01, dtype=torch.float16)


def _nan(key: str, value: float):
    def change(t: dict, lora, m) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value

    return change


# name: (change to the tensors and metadata of a trained LoHA, what every message says).
REFUSED_BY_ALL = {
    "int8": (_dtype(f"{FC1}.hada_w1_a", torch.int8), rf"{FC1}\.hada_w1_a is I8; network"),
    "uint8": (_dtype(f"{FC1}.hada_w1_a", torch.uint8), rf"{FC1}\.hada_w1_a is U8; network"),
    "bool": (_dtype(f"{FC1}.hada_w1_a", torch.bool), rf"{FC1}\.hada_w1_a is BOOL; network"),
    "fp8": (_dtype(f"{FC1}.hada_w2_b", torch.float8_e4m3fn), rf"{FC1}\.hada_w2_b is F8_E4M3"),
    "halves": (
        _set(f"{FC1}.hada_w1_a", torch.ones(72, 4, dtype=torch.float16)),
        rf"key {FC1}\.\* makes a 72x32 change with its first Hadamard pair and 64x32 with",
    ),
    "broadcast": (  # lycoris' copy_ would broadcast [64, 1] onto [64, 4]
        _set(f"{FC1}.hada_w1_a", torch.ones(64, 1, dtype=torch.float16)),
        rf"{FC1}: hada_w1_a \[64, 1\] @ hada_w1_b \[4, 32\] do not multiply",
    ),
    "nan": (_nan(f"{FC1}.hada_w1_a", float("nan")), rf"{FC1}\.hada_w1_a holds NaN or inf"),
    "inf": (_nan(f"{FC1}.hada_w2_b", float("inf")), rf"{FC1}\.hada_w2_b holds NaN or inf"),
    "nan-alpha": (_nan(f"{FC1}.alpha", float("nan")), rf"{FC1}\.alpha holds NaN or inf"),
    "huge-values": (  # finite, but their product is not: lycoris and merge would compute inf
        lambda t, lora, m: t.update(
            {k: torch.full_like(v, 1e20, dtype=torch.float32) for k, v in t.items() if FC1 in k}
        ),
        rf"{FC1}: its factors \(up to 1e\+20\) rebuild a change of up to .* past float32",
    ),
    "sdxl": (_sdxl, r"SDXL (network \(key lora_te1_|key)"),
    "twice": (_twice, rf"{FC1} and lora_te1_\w+ are the same text-encoder layer under two"),
    "missing": (lambda t, lora, m: t.pop(f"{FC1}.hada_w2_b"), rf"{FC1}: hada_w2_b missing"),
    "alpha-vector": (_set(f"{FC1}.alpha", torch.ones(5)), rf"{FC1}\.alpha has shape \[5\]"),
    "unknown-suffix": (  # a tensor no LoHA module has: A1111 and ComfyUI drop it silently
        _set(f"{FC1}.hada_w3_a", torch.ones(64, 4, dtype=torch.float16)),
        rf"{FC1}\.hada_w3_a: not a tensor of a LoHA module",
    ),
    "mixed-algos": (
        _set(f"{FC1}.lokr_w1", torch.ones(8, 4, dtype=torch.float16)),
        rf"{FC1} mixes LoHA and LoKr tensors",
    ),
    "not-a-network": (
        lambda t, lora, m: (t.clear(), t.update({"first_stage_model.x": torch.ones(2)})),
        r"is not a LoRA/(LyCORIS|LoCon/LoHA) network",
    ),
}
# Refused where the file meets a model; inspect has none, and describes these files.
REFUSED_WITH_A_MODEL = {
    "shape": (
        lambda t, lora, m: t.update(
            {f"{FC1}.hada_{h}_a": torch.ones(72, 4, dtype=torch.float16) for h in ("w1", "w2")}
        ),
        r"makes a 72x32 change|rebuild a \[72, 32\] delta",
    ),
    "transposed": (
        lambda t, lora, m: [
            _transposed(t, f"{FC1}.hada_{h}_a", f"{FC1}.hada_{h}_b") for h in ("w1", "w2")
        ],
        r"(32x64 change|\[32, 64\] delta).*its factors are transposed",
    ),
    "lora-transposed": (_lora_transposed, r"its factors are transposed"),
    "sd2": (_sd2, r"an SD 2\.x network: its cross-attention reads a 1024-wide text context"),
    "lokr-huge": (  # refused from the shapes: nothing of 16 GiB is ever allocated
        _lokr_huge,
        r"65536x65536 change|\[65536, 65536\] delta|have no place in it",
    ),
    "unknown-layer": (
        _unknown_layer,
        r"lora_unet_not_a_layer\S* (matches|match) no layer|no place",
    ),
    "foreign-key": (
        _set("foo.bar", torch.ones(3, dtype=torch.float16)),
        r"foo(\.bar)? (matches no layer|have no place)|match no layer of this model, e\.g\. foo",
    ),
}
# What only generate reads from a network's metadata, without --model or --size.
REFUSED_BY_GENERATE = {
    "clip-skip": (
        lambda t, lora, m: m.update(ss_clip_skip="99"),
        r"its metadata ss_clip_skip '99' is not one of 1 to 12",
    ),
    "token-length": (
        lambda t, lora, m: m.update(ss_max_token_length="100000000"),
        r"ss_max_token_length '100000000' is not one of 75, 150, 225",
    ),
    "resolution": (
        lambda t, lora, m: m.update({"modelspec.resolution": "100000x100000"}),
        r"its modelspec\.resolution '100000x100000' is not a size from 64x64 to 4096x4096",
    ),
    "recipe-not-json": (
        lambda t, lora, m: m.update(meebs_recipe="{not json"),
        r"its meebs_recipe records no usable base model",
    ),
    "recipe-pickle": (
        lambda t, lora, m: m.update(
            meebs_recipe=json.dumps({"model": {"path": "/x/base.ckpt", "allow_pickle": True}})
        ),
        r"was trained on the pickle file '/x/base\.ckpt'; generate never unpickles",
    ),
}


def _unusual(t: dict, lora, m: dict) -> None:
    """F64 factors, integer alphas (as kohya writes alpha = dim), 11 MB of metadata."""
    for key, value in t.items():
        t[key] = torch.tensor(int(value.item())) if key.endswith(".alpha") else value.double()
    m.update(
        ss_tag_frequency=json.dumps({"10_meeb": {f"tag{i}": i for i in range(400_000)}}),
        ss_training_comment="x" * (5 * MIB),
        ss_output_name="[/bold]\x1b[2J\x07",
    )


# Unusual but right: it must give exactly what the original gives.
ACCEPTED = {"unusual": _unusual}
CASES = {**REFUSED_BY_ALL, **REFUSED_WITH_A_MODEL, **REFUSED_BY_GENERATE}


@dataclass(frozen=True)
class Files:
    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    """Every file of this module, in one folder: the original and its changed copies."""
    folder = tmp_path_factory.mktemp("nets")
    loha, lora = trained(folder, NetworkSpec()), trained(folder, NetworkSpec(algo="lora"))
    metadata = {"meebs_recipe": TINY_RECIPE, "ss_clip_skip": "1"}
    save_file(loha, folder / "good.safetensors", metadata)
    for name, change in {**{n: c for n, (c, _) in CASES.items()}, **ACCEPTED}.items():
        tensors = {key: value.clone() for key, value in loha.items()}
        meta = dict(metadata)
        change(tensors, lora, meta)
        save_file(tensors, folder / f"{name}.safetensors", meta)
    (folder / "text.safetensors").write_text("not a network")
    header = b'{"a.hada_w1_a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},'
    header += b'"a.hada_w1_a":{"dtype":"I16","shape":[1],"data_offsets":[0,2]}}'
    (folder / "key-twice.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0\0"
    )
    return Files(folder)


def trained(folder: Path, spec: NetworkSpec) -> dict[str, torch.Tensor]:
    """A tiny network as after training (every factor random), saved and read back."""
    network = random_network(spec)
    path = folder / f"source-{spec.algo}.safetensors"
    save_network(network, path, {}, torch.float16)
    return load_file(path)


@pytest.fixture(autouse=True)
def eager_lycoris(monkeypatch):
    """lycoris' eager kernels instead of torch.compile per layer shape (see test_merge)."""
    from lycoris.kernels import dispatch

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    monkeypatch.setattr(dispatch, "_available", None)


def one_line(capsys, argv: list[str]) -> str:
    """Run the command line; it must exit 2 with one `error:` line, its last output."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


def generate_argv(files: Files, name: str, out: Path, *extra: str) -> list[str]:
    options = extra or ("--model", "builtin:tiny", "--size", "64x64")
    tag = f"a drawing of meeb <lyco:{name}:1>"
    argv = ["generate", tag, "--networks", str(files.folder), "--out", str(out), "--seed", "1"]
    return [*argv, "--steps", "1", *options]


def merge_argv(network: Path, into: Path) -> list[str]:
    return ["merge", str(network), "--into", str(into), "--model", "builtin:tiny"]


# ---------------------------------------------------------------------------- refused


@pytest.mark.parametrize("name", [*REFUSED_BY_ALL, "text", "key-twice"])
def test_inspect_refuses_with_one_line(files, capsys, name):
    line = one_line(capsys, ["inspect", str(files.path(name))])
    assert str(files.path(name)) in line
    assert re.search(_expected(name), line), line


@pytest.mark.parametrize("name", [*CASES, "text", "key-twice"])
def test_generate_refuses_with_one_line_and_draws_nothing(
    files, capsys, tmp_path, name, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # an empty outputs/ root
    out = tmp_path / "out"
    extra = ("--size", "64x64") if name.startswith("recipe") else ()
    extra = ("--model", "builtin:tiny") if name == "resolution" else extra
    line = one_line(capsys, generate_argv(files, name, out, *extra))
    assert str(files.path(name)) in line
    assert re.search(_expected(name), line), line
    assert not out.exists()


@pytest.mark.parametrize("name", [*REFUSED_BY_ALL, *REFUSED_WITH_A_MODEL, "text", "key-twice"])
def test_merge_refuses_with_one_line_and_writes_nothing(files, capsys, tmp_path, name):
    into = tmp_path / "merged.safetensors"
    line = one_line(
        capsys, ["merge", str(files.path(name)), "--into", str(into), "--model", "builtin:tiny"]
    )
    assert str(files.path(name)) in line
    assert re.search(_expected(name), line), line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def networks() -> dict[str, object]:
    """The networks recipes with the default LoHA, or LoRA, settings train on the tiny base."""
    built = {}
    for algo in ("loha", "lora"):
        base = build_tiny()
        built[algo] = build_network(base.unet, base.text_encoder, NetworkSpec(algo=algo))
    return built


@pytest.mark.parametrize("name", [*REFUSED_BY_ALL, *REFUSED_WITH_A_MODEL, "text", "key-twice"])
def test_network_weights_refuses_with_one_line(files, networks, name):
    network = networks["lora" if name.startswith("lora") else "loha"]
    before = network_state_dict(network, torch.float32)
    with pytest.raises(MeebsError) as error:
        load_network_weights(network, files.path(name))
    message = str(error.value)
    assert "\n" not in message and str(files.path(name)) in message
    assert re.search(_expected(name), message), message
    after = network_state_dict(network, torch.float32)
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing half-loaded


def test_network_weights_on_the_command_line_is_one_line(files, capsys, tmp_path, monkeypatch):
    """The train command stops before its first step, and leaves no run folder."""
    monkeypatch.chdir(REPO)  # the demo recipe's data folders are relative
    overrides = ["model.builtin=tiny", "train.epochs=1", "sample.every_n_epochs=0"]
    overrides += [f"output.dir={tmp_path}", f"network.weights={files.path('nan')}"]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        line = one_line(capsys, ["train", "recipes/demo.yaml", *overrides])
    finally:  # train sets both for the process; the tests after it draw with the defaults
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert re.search(rf"{re.escape(str(files.path('nan')))}: {FC1}\.hada_w1_a holds NaN", line)
    assert list(tmp_path.iterdir()) == []


def _expected(name: str) -> str:
    fixed = {"text": r"is not a readable safetensors file", "key-twice": r"a\.hada_w1_a.* twice"}
    return fixed.get(name) or CASES[name][1]


# ---------------------------------------------------------------------------- accepted


def test_an_unusual_but_right_file_draws_what_the_original_draws(
    files, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    drawn = {}
    for name in ["good", "unusual"]:
        assert main(generate_argv(files, name, tmp_path / name)) == 0
        (png,) = (tmp_path / name).iterdir()
        drawn[name] = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(drawn["unusual"], drawn["good"])


def test_an_unusual_but_right_file_merges_and_loads_like_the_original(files, capsys, tmp_path):
    digests, states = {}, {}
    for name in ["good", "unusual"]:
        into = tmp_path / f"{name}.safetensors"
        assert main(merge_argv(files.path(name), into)) == 0
        digests[name] = into.with_name(into.name + ".sha256").read_text().split()[0]
        base = build_tiny()
        network = build_network(base.unet, base.text_encoder, NetworkSpec())
        load_network_weights(network, files.path(name))
        states[name] = network_state_dict(network, torch.float32)
    assert digests["unusual"] == digests["good"]
    assert all(torch.equal(states["good"][k], states["unusual"][k]) for k in states["good"])


def test_merge_writes_no_weight_that_fp16_cannot_hold(files, capsys, tmp_path):
    """Factors of 16 make a change of 262,144 on fc1: fine in fp32, inf in an fp16 file."""
    tensors = load_file(files.path("good"))
    for key in [key for key in tensors if key.startswith(f"{FC1}.hada_")]:
        tensors[key] = torch.full_like(tensors[key], 16.0, dtype=torch.float32)
    network = tmp_path / "large.safetensors"
    save_file(tensors, network)
    line = one_line(capsys, merge_argv(network, tmp_path / "merged.safetensors"))
    weight = "the merged text encoder weight encoder.layers.0.mlp.fc1.weight is NaN or inf in fp16"
    assert f"{network}: {weight}" in line
    assert not (tmp_path / "merged.safetensors").exists()
    argv = [*merge_argv(network, tmp_path / "merged32.safetensors"), "--save-precision", "fp32"]
    assert main(argv) == 0


def test_inspect_shows_megabytes_of_metadata_clipped(files):
    console = Console(record=True, width=120, file=io.StringIO())
    inspect_file(files.path("unusual"), console)
    text = console.export_text()
    assert len(text) < 20_000, len(text)  # not 10 MB of metadata
    assert "… (5,242,880 characters)" in text  # the comment, cut
    assert "tag399999 (399999)" in text  # the most frequent tags of ss_tag_frequency
    assert "[/bold]" in text and "\\x1b" in text and "\x1b" not in text  # no markup, no escapes
    assert "largest ss_tag_frequency" in text


def test_inspect_clips_megabytes_of_metadata_that_is_not_json(files, tmp_path, capsys):
    path = tmp_path / "junk.safetensors"
    save_file(load_file(files.path("good")), path, {"ss_tag_frequency": "{" * (5 * MIB)})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert len(out) < 20_000 and "… (5,242,880 characters)" in out


def test_inspect_describes_what_only_a_model_can_refuse(files, capsys):
    for name in REFUSED_WITH_A_MODEL:
        assert main(["inspect", str(files.path(name))]) == 0, name
    assert "LoHA" in capsys.readouterr().out
