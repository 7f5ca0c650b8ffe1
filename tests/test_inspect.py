"""inspect: what a network file holds, read from its header."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.models.builtin_models import build_tiny
from meebs.network.build import NetworkSpec, build_network, count_modules, save_network
from meebs.use.inspect import describe


def saved(tmp_path: Path, spec: NetworkSpec, metadata: dict[str, str]) -> tuple[Path, int, tuple]:
    """A freshly built tiny network saved in fp16: (file, tensor count, module counts)."""
    base = build_tiny()
    torch.manual_seed(0)
    network = build_network(base.unet, base.text_encoder, spec)
    path = tmp_path / "net.safetensors"
    save_network(network, path, metadata, torch.float16)
    return path, len(network.state_dict()), count_modules(network)


def test_a_loha_file_is_described(tmp_path):
    metadata = {
        "ss_output_name": "meebs_x",
        "ss_training_comment": "hello",
        "ss_steps": "60",
        "ss_epoch": "2",
        "ss_num_epochs": "3",
        "ss_new_sd_model_hash": "ab" * 32,
        "meebs_recipe": '{"output": {"name": "recipe_x"}}',
    }
    spec = NetworkSpec(algo="loha", dim=4, alpha=1, conv_dim=2, conv_alpha=0.5)
    path, keys, (unet, te) = saved(tmp_path, spec, metadata)
    rows = dict(describe(path))
    assert rows["keys"] == str(keys)
    assert rows["modules"] == f"{unet} UNet, {te} TE"
    assert rows["algo"] == "LoHA"
    assert rows["ranks"] == "2, 4"
    assert rows["alphas"] == "0.5, 1"
    assert rows["dtype"] == "F16"
    assert rows["recipe name"] == "recipe_x" and rows["output name"] == "meebs_x"
    assert rows["comment"] == "hello" and rows["steps"] == "60" and rows["epoch"] == "2 of 3"
    assert rows["base model hash"] == "ab" * 32
    raw = path.read_bytes()
    tensors = raw[8 + int.from_bytes(raw[:8], "little") :]
    assert rows["sshs hash"] == hashlib.sha256(tensors).hexdigest()
    assert rows["size"] == f"{len(raw) / 2**20:.2f} MiB"


def test_lora_and_the_legacy_hash(tmp_path):
    spec = NetworkSpec(algo="lora", dim=8, alpha=4, conv_dim=0)
    path, _, _ = saved(tmp_path, spec, {"ss_sd_model_hash": "1234abcd"})
    rows = dict(describe(path))
    assert rows["algo"] == "LoRA/LoCon" and rows["ranks"] == "8" and rows["alphas"] == "4"
    assert rows["base model hash"] == "1234abcd" and rows["comment"] == "-"


def test_cli_prints_a_table(tmp_path, capsys):
    path, _, _ = saved(tmp_path, NetworkSpec(), {})
    assert main(["inspect", str(path)]) == 0
    assert "LoHA" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["text", "no network"])
def test_not_a_network_is_one_line(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    if kind == "text":
        path.write_text("hello")
    else:
        save_file({"first_stage_model.weight": torch.zeros(2)}, path)
    with pytest.raises(MeebsError) as error:
        describe(path)
    assert "\n" not in str(error.value)
    assert main(["inspect", str(path)]) == 2
