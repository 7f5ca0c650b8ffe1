"""kohya_ss GUI configs: import, export, the round trip and one-line errors.

The fixtures in kohya_configs/ are written after the keys a saved kohya_ss LoRA config
uses (REFERENCE section 8), in the styles seen in the wild: a recent GUI (LoHa), LoCon with
optimizer arguments, a Standard LoRA from a hub id with an empty seed, and an old config
whose numbers and booleans are strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meebs.cli import main
from meebs.errors import MeebsError
from meebs.interop.kohya_export import export_kohya
from meebs.interop.kohya_import import import_kohya
from meebs.models.fetch import read_pins
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe

CONFIGS = Path(__file__).resolve().parent / "kohya_configs"
FIXTURES = sorted(CONFIGS.glob("*.json"))


def imported(tmp_path: Path, config: Path, name: str = "imported.yaml") -> Recipe:
    path = tmp_path / name
    path.write_text(import_kohya(config).text, encoding="utf-8")
    return load_recipe(path)


def test_every_fixture_is_found():
    assert {p.stem for p in FIXTURES} == {"loha", "locon", "standard", "old_strings"}


def test_loha_config_as_the_original_project_trained(tmp_path):
    recipe = imported(tmp_path, CONFIGS / "loha.json")
    net, train = recipe.network, recipe.train
    assert (net.algo, net.dim, net.alpha, net.conv_dim, net.conv_alpha) == ("loha", 4, 1, 4, 1)
    assert (recipe.unet_lr, recipe.text_encoder_lr) == (1e-4, 5e-5)
    assert (train.batch_size, train.epochs, train.seed) == (2, 5, 1234)  # seed was "1234"
    assert (train.optimizer, train.mixed_precision, train.noise_offset) == (
        "AdamW8bit",
        "fp16",
        0.06,
    )
    assert train.lr_warmup == 0.05  # 5 percent
    assert train.lr_scheduler_num_cycles == 5  # "" = one per epoch
    assert train.attention == "xformers"
    assert recipe.data.reg_dir == "/workspace/meebs/reg"
    assert recipe.sample.sampler == "Euler a"  # kohya's euler_a
    assert recipe.sample.prompts[1] == "a drawing of meeb waving --n lowres --w 512 --h 768"
    assert recipe.model.sha256 == read_pins()["sd15"].sha256  # the pinned file's name


def test_locon_config(tmp_path):
    recipe = imported(tmp_path, CONFIGS / "locon.json")
    net, train = recipe.network, recipe.train
    assert (net.algo, net.dim, net.conv_dim, net.use_tucker) == ("locon", 16, 8, True)
    assert train.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert (train.lr_scheduler, train.lr_warmup) == ("constant_with_warmup", 0.1)
    assert train.noise_offset == 0  # noise_offset_type Multires: not the Original offset
    assert recipe.output.save_precision == "fp32"  # kohya's "float"
    assert recipe.output.keep_last_n_epochs == 3
    assert recipe.data.resolution == [768, 768]
    assert recipe.sample.sampler == "DPM++ 2M"  # dpmsolver++
    assert recipe.model.sha256 is None  # not the pinned file


def test_standard_lora_with_hub_id_empty_seed_and_warmup_steps(tmp_path):
    result = import_kohya(CONFIGS / "standard.json")
    recipe = imported(tmp_path, CONFIGS / "standard.json")
    assert (recipe.network.algo, recipe.network.conv_dim) == ("lora", 0)  # Standard: no convs
    assert recipe.model.path == f"models/{read_pins()['sd15'].file}"
    assert recipe.train.seed == Recipe().train.seed
    assert recipe.train.epochs == 8  # max_train_epochs wins over epoch
    assert recipe.train.lr_warmup == 0.1  # lr_warmup_steps 160 of max_train_steps 1600
    assert (recipe.unet_lr, recipe.text_encoder_lr) == (1e-4, 0)  # UNet only
    assert recipe.data.resolution == [512, 512]  # "512"
    assert recipe.train.clip_skip == 1  # 0 = none
    notes = "\n".join(result.notes)
    for mentioned in ("seed", "conv_dim=8", "runwayml/stable-diffusion-v1-5", "max_train_steps"):
        assert mentioned in notes


def test_old_string_values(tmp_path):
    recipe = imported(tmp_path, CONFIGS / "old_strings.json")
    assert recipe.network.use_tucker is False  # "False" must not turn Tucker on
    assert recipe.data.cache_latents is True and recipe.data.enable_bucket is False
    assert (recipe.network.dim, recipe.network.alpha, recipe.network.conv_dim) == (8, 4.0, 8)
    assert recipe.train.learning_rate == 1e-4 and recipe.train.gradient_accumulation_steps == 1
    assert recipe.train.unet_lr is None and recipe.train.text_encoder_lr is None  # "" and ""
    assert recipe.train.seed == Recipe().train.seed  # "0" = random in kohya
    assert recipe.train.attention == "xformers"  # "True"


@pytest.mark.parametrize("config", FIXTURES, ids=lambda p: p.stem)
def test_round_trip(tmp_path, config):
    first = imported(tmp_path, config)
    exported = tmp_path / "exported.json"
    exported.write_text(export_kohya(tmp_path / "imported.yaml").text, encoding="utf-8")
    assert imported(tmp_path, exported, "again.yaml") == first


def test_export_writes_gui_types_and_names_the_rest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(import_kohya(CONFIGS / "loha.json").text, encoding="utf-8")
    result = export_kohya(path)
    config = json.loads(result.text)
    assert config["LoRA_type"] == "LyCORIS/LoHa" and config["save_precision"] == "fp16"
    assert config["network_dim"] == 4 and config["use_tucker"] is False
    assert config["lr_warmup"] == 5 and config["sample_sampler"] == "euler_a"
    assert config["max_resolution"] == "512,512"
    assert any("data.background" in note for note in result.notes)


def test_cli_prints_the_recipe_and_lists_unconverted_keys_on_stderr(tmp_path, capsys):
    assert main(["import-kohya", str(CONFIGS / "loha.json")]) == 0
    out, err = capsys.readouterr()
    (tmp_path / "r.yaml").write_text(out, encoding="utf-8")
    assert load_recipe(tmp_path / "r.yaml").output.name == "meeb_v1.3"
    for key in ("bucket_no_upscale", "color_aug", "multires_noise_iterations", "wandb_api_key"):
        assert key in err
    assert all(line.startswith("note: ") for line in err.splitlines())
    assert main(["export-kohya", str(tmp_path / "r.yaml")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["output_name"] == "meeb_v1.3" and "sample.seed" in err


BASE = json.loads((CONFIGS / "loha.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"LoRA_type": "LyCORIS/LoKr"}, "LoRA_type"),
        ({"network_dim": "eight"}, "network_dim"),
        ({"optimizer": "Lion"}, "optimizer"),
        ({"sample_sampler": "dpmsingle"}, "sample_sampler"),
        ({"sample_prompts": "meeb --g 3.5"}, "sample_prompts"),
        ({"save_precision": "fp8"}, "save_precision"),
        ({"lr_scheduler": "constant", "lr_warmup": 10}, "lr_warmup"),
        ({"lr_warmup_steps": 100}, "lr_warmup_steps"),
        ({"cache_latents": "yes"}, "cache_latents"),
        ({"v2": "True"}, "v2"),
        ({"pretrained_model_name_or_path": ""}, "pretrained_model_name_or_path"),
        ({"output_name": ""}, "output_name"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path, capsys, change, named):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BASE | change), encoding="utf-8")
    with pytest.raises(MeebsError, match=named):
        import_kohya(path)
    assert main(["import-kohya", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err


def test_invalid_json_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "LoRA_type": "Standard",\n  "epoch": 1,,\n}', encoding="utf-8")
    assert main(["import-kohya", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 3" in err and "\n" not in err
