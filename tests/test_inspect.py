"""inspect: what a network file holds, read from its header."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.models.builtin_models import build_tiny
from meebs.network.build import NetworkSpec, build_network, count_modules
from meebs.network.save import save_network
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


@pytest.mark.parametrize(
    ("spec", "algo", "args"),
    [
        (
            NetworkSpec(algo="lokr", dim=1, conv_dim=1, decompose_both=True),
            "LoKr",
            r"LoKr: lokr_w1 \d+x\d+.* \(factor\), decompose_both on \d+ of \d+",
        ),
        (NetworkSpec(algo="lokr", full_matrix=True), "LoKr", r"full_matrix on (\d+) of \1"),
        (NetworkSpec(algo="glora", dim=2), "GLoRA", r"^-$"),
        (
            NetworkSpec(algo="diag-oft", dim=4, constraint=0.01, rescaled=True),
            "Diag-OFT",
            r"Diag-OFT: block size [\d, ]+, constraint 0\.01, rescaled on (\d+) of \1",
        ),
        (NetworkSpec(algo="full"), "Full", r"Full: bias \(diff_b\) on \d+ of \d+"),
        (NetworkSpec(algo="ia3"), "IA3", r"IA3: train_on_input on \d+ of \d+"),
        (
            NetworkSpec(algo="loha", dora_wd=True, use_tucker=True),
            "LoHA + DoRA",
            r"LoHA: use_tucker on \d+ of \d+; DoRA \(dora_wd\) on (\d+) of \1, magnitude per "
            r"input column \(wd_on_output False\)",
        ),
    ],
)
def test_each_algo_and_its_arguments_are_shown(tmp_path, spec, algo, args):
    path, _, _ = saved(tmp_path, spec, {"ss_network_args": '{"algo": "x"}'})
    rows = dict(describe(path))
    assert rows["algo"] == algo
    assert re.search(args, rows["algo args"]), rows["algo args"]
    assert rows["network args"] == '{"algo": "x"}'
