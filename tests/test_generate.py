"""generate: A1111 prompt tags, network lookup, seeds, multipliers, PNG parameters, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.models.builtin_models import build_tiny
from meebs.use.generate import Request, generate
from meebs.use.prompt_tags import parse_prompt, weight_warnings

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"
TRIGGER = "a drawing of meeb holding a laptop"
SAMPLERS = ["Euler a", "Euler", "DDIM", "DPM++ 2M", "DPM++ 2M Karras"]


@pytest.fixture
def outputs(short_demo) -> Path:
    """An outputs/ folder holding one 2-epoch demo run (meebs_demo, meebs_demo-000001),
    shared by the session: read only."""
    return short_demo.outputs


def network_file(outputs: Path, name: str = "meebs_demo") -> Path:
    return next(outputs.rglob(f"{name}.safetensors"))


def draw(outputs: Path, out: Path, prompt: str, **options) -> tuple[list[Path], str]:
    """Run generate quietly with 2 steps and seed 1 unless told otherwise; (files, output)."""
    console = Console(file=io.StringIO(), width=400)
    options = {"seed": 1, "steps": 2, **options}
    files = generate(Request(prompt=prompt, outputs=outputs, out=out, **options), console)
    return files, console.file.getvalue()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- prompt tags


def test_tags_are_parsed_the_a1111_way_and_removed_from_the_text():
    text, tags = parse_prompt(
        "meeb <lyco:a:0.5>, smiling <lora:b:1:-0.25> <lora:c> <lora:d:0.5:te=2:unet=0>"
    )
    assert text == "meeb , smiling"
    assert [(t.name, t.te, t.unet) for t in tags] == [
        ("a", 0.5, 0.5),
        ("b", 1.0, -0.25),
        ("c", 1.0, 1.0),
        ("d", 2.0, 0.0),
    ]
    assert weight_warnings(tags) == []  # 2 itself is allowed without a warning
    assert weight_warnings(parse_prompt("<lora:x:-2.5>")[1])[0].startswith("<lora:x:-2.5>: te")


@pytest.mark.parametrize(
    "prompt",
    ["meeb <lora:x:abc>", "meeb <lora:>", "meeb <lyco:x:1", "<lora:x:nan>", "<lora:x:1:dyn=4>"],
)
def test_malformed_tags_are_one_line_errors(prompt):
    with pytest.raises(MeebsError) as error:
        parse_prompt(prompt)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- images


def test_a_seed_gives_the_same_file_twice(outputs, tmp_path):
    prompt = f"{TRIGGER} <lyco:meebs_demo:1>"
    first, _ = draw(outputs, tmp_path / "a", prompt)
    second, _ = draw(outputs, tmp_path / "b", prompt)
    assert first[0].read_bytes() == second[0].read_bytes()
    other, _ = draw(outputs, tmp_path / "c", prompt, seed=2)
    assert not np.array_equal(pixels(other[0]), pixels(first[0]))


def test_weight_zero_is_the_base_model_and_weight_one_is_not(outputs, tmp_path):
    (base,), _ = draw(outputs, tmp_path, TRIGGER, model="builtin:tiny", size="64x64")
    (zero,), _ = draw(outputs, tmp_path, f"{TRIGGER} <lyco:meebs_demo:0>")
    (one,), _ = draw(outputs, tmp_path, f"{TRIGGER} <lyco:meebs_demo:1>")
    (unet_only,), _ = draw(outputs, tmp_path, f"{TRIGGER} <lora:meebs_demo:te=0:unet=1>")
    assert np.array_equal(pixels(zero), pixels(base))
    change = np.abs(pixels(one) - pixels(base)).mean()
    assert change > 1.0, f"the trained LoHA barely changes the trigger prompt ({change:.2f})"
    assert not np.array_equal(pixels(unet_only), pixels(one))  # the TE multiplier counts
    assert not np.array_equal(pixels(unet_only), pixels(base))


def test_files_are_numbered_and_never_overwritten(outputs, tmp_path):
    files, _ = draw(outputs, tmp_path, "<lyco:meebs_demo:1> meeb", count=2, seed=7)
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    again, _ = draw(outputs, tmp_path, "<lyco:meebs_demo:1> meeb", seed=7)
    assert again[0].name == "00002-7.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000-7.png",
        "00001-8.png",
        "00002-7.png",
    ]


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative, settings), read as A1111's `parse_generation_parameters` does."""
    setting = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    settings = {}
    for key, value in setting.findall(last):
        settings[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt), "\n".join(negative), settings


def addnet_hash_of(path: Path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_png_parameters_read_back_like_a1111(outputs, tmp_path, sampler):
    prompt = f"{TRIGGER} <lyco:meebs_demo:0.8> <lora:meebs_demo-000001:0.5>"
    (path,), _ = draw(
        outputs,
        tmp_path,
        prompt,
        negative="blurry, lowres",
        seed=5,
        steps=3,
        cfg=6.5,
        sampler=sampler,
        size="64x48",
    )
    text = Image.open(path).text["parameters"]
    got_prompt, negative, settings = parse_parameters(text)
    final, first = network_file(outputs), network_file(outputs, "meebs_demo-000001")
    assert got_prompt == prompt and negative == "blurry, lowres"
    assert settings == {
        "Steps": "3",
        "Sampler": sampler,
        "CFG scale": "6.5",
        "Seed": "5",
        "Size": "64x48",
        "Model hash": build_tiny().sha256[:10],
        "Model": "tiny",
        "Lora hashes": f"meebs_demo: {addnet_hash_of(final)[:12]}, "
        f"meebs_demo-000001: {addnet_hash_of(first)[:12]}",
    }
    assert Image.open(path).size == (64, 48)


def test_the_newest_file_of_a_name_is_used_and_said(outputs, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    older = network_file(outputs, "meebs_demo-000001")
    copy = shutil.copy(older, extra / "meebs_demo.safetensors")
    future = network_file(outputs).stat().st_mtime_ns + 10**9
    os.utime(copy, ns=(future, future))
    (path,), said = draw(outputs, tmp_path / "out", "<lyco:meebs_demo:1> meeb", networks=[extra])
    assert f"2 files named meebs_demo.safetensors; using the newest, {copy}" in said
    settings = parse_parameters(Image.open(path).text["parameters"])[2]
    assert settings["Lora hashes"] == f"meebs_demo: {addnet_hash_of(older)[:12]}"


def test_large_weights_are_allowed_with_a_warning(outputs, tmp_path):
    _, said = draw(outputs, tmp_path, "meeb <lyco:meebs_demo:2.5>")
    assert "warning:" in said and "2.5 is above 2" in said


# ---------------------------------------------------------------- bad input


def foreign_file(outputs: Path, tmp_path: Path, kind: str) -> Path:
    """A file named `bad` in tmp_path/nets that is not a usable SD 1.5 network."""
    folder = tmp_path / "nets"
    folder.mkdir()
    path = folder / "bad.safetensors"
    if kind == "text":
        path.write_text("not a network")
        return path
    tensors = load_file(network_file(outputs))
    if kind == "no network":
        tensors = {"model.diffusion_model.out.0.weight": torch.zeros(4)}
    elif kind == "sdxl":
        tensors = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(4, 2)}
    elif kind == "shape":
        key = sorted(k for k in tensors if k.endswith("hada_w1_a"))[0]
        tensors[key] = torch.zeros(tensors[key].shape[0] + 8, tensors[key].shape[1])
    save_file(tensors, path)
    return path


@pytest.mark.parametrize(
    ("prompt", "kind", "options", "message"),
    [
        ("<lyco:meebs_dmo:1>", None, {}, "no network named 'meebs_dmo'.*did you mean meebs_demo"),
        ("<lyco:bad:1>", "text", {}, "not a readable safetensors file"),
        ("<lyco:bad:1>", "no network", {}, "is not a LoRA/LyCORIS network"),
        ("<lyco:bad:1>", "sdxl", {}, "SDXL network \\(key lora_te1_text_model"),
        (
            "<lyco:bad:1>",
            "shape",
            {"model": "builtin:tiny"},
            "key lora_\\w+\\.\\* makes a \\d+x\\d+ change",
        ),
        ("<lyco:meebs_demo:x>", None, {}, "weight 'x' is not a number"),
        ("meeb <lyco:meebs_demo:1>", None, {"sampler": "Euler b"}, "unknown sampler 'Euler b'"),
        ("meeb", None, {}, "no network tag in the prompt: give the base model with --model"),
        ("<lyco:meebs_demo:1>", None, {"size": "64"}, "--size '64': write WIDTHxHEIGHT"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    outputs, tmp_path, prompt, kind, options, message
):
    networks = [foreign_file(outputs, tmp_path, kind).parent] if kind else []
    out = tmp_path / "out"
    with pytest.raises(MeebsError) as error:
        draw(outputs, out, prompt, networks=networks, **options)
    assert re.search(message, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_cli_exits_2_with_the_sampler_list(outputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default outputs/ root: empty here
    out = tmp_path / "out"
    argv = ["generate", "<lyco:meebs_demo:1>", "--sampler", "nope", "--out", str(out)]
    argv += ["--networks", str(outputs)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "unknown sampler 'nope'" in error and "'DPM++ 2M Karras'" in error
    assert not out.exists()
