"""kohya_ss GUI configs: import, export, the round trip and one-line errors.

The fixtures in kohya_configs/ are written after the keys a saved kohya_ss LoRA config
uses (REFERENCE section 8), in the styles seen in the wild: a recent GUI (LoHa), LoCon with
optimizer arguments, a Standard LoRA from a hub id with an empty seed, and an old config
whose numbers and booleans are strings. kohya_configs/kohya_ss/ holds copies of the 36
SD 1.x configs the kohya_ss repository ships (presets/lora, test/config; its README names
each source): every one converts or is refused for a reason asserted per file.
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
from meebs.recipe.schema import OPTIMIZERS, Recipe

CONFIGS = Path(__file__).resolve().parent / "kohya_configs"
FIXTURES = sorted(CONFIGS.glob("*.json"))
REAL = CONFIGS / "kohya_ss"
# What a preset leaves for the user, as a test fills it in.
FILLED = {"model.path": "models/sd15.safetensors", "data.train_dir": "data/img"}


def imported(tmp_path: Path, config: Path, name: str = "imported.yaml") -> Recipe:
    path = tmp_path / name
    result = import_kohya(config)
    path.write_text(result.text, encoding="utf-8")
    return load_recipe(path, [f"{key}={FILLED[key]}" for key in result.fill_in])


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
        ({"LoRA_type": "LyCORIS/BOFT"}, "LoRA_type"),
        ({"LoRA_type": "Kohya DyLoRA"}, "LoRA_type"),
        ({"LoRA_type": "LoRA-FA"}, "LoRA_type"),
        ({"LoRA_type": "Custom"}, "LoRA_type"),
        ({"network_dim": "eight"}, "network_dim"),
        ({"network_dim": 2048}, "network_dim"),  # LoHa: above meebs' 1024
        ({"LoRA_type": "LyCORIS/LoKr", "factor": 1, "network_dim": 2000}, "network_dim"),
        ({"optimizer": "PagedAdamW32bit"}, "optimizer"),
        ({"lr_scheduler": "adafactor"}, "lr_scheduler"),  # with AdamW8bit: sd-scripts stops
        ({"lr_scheduler": "cosine_with_min_lr"}, "lr_scheduler"),
        ({"LyCORIS_preset": "attn-only"}, "LyCORIS_preset"),
        ({"train_norm": True}, "train_norm"),
        ({"LoRA_type": "Standard", "block_dims": "2,4,4,4,8,8,8,8,4,4,4,2"}, "block_dims"),
        ({"LoRA_type": "Kohya LoCon", "up_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,0.5"}, "up_lr_weight"),
        ({"vae": "stabilityai/sd-vae-ft-mse"}, "vae"),
        ({"masked_loss": True}, "masked_loss"),
        ({"loss_type": "huber"}, "loss_type"),
        ({"debiased_estimation_loss": "True"}, "debiased_estimation_loss"),
        ({"weighted_captions": True}, "weighted_captions"),
        ({"min_timestep": 100}, "min_timestep"),
        ({"lr_scheduler_type": "CosineAnnealingLR"}, "lr_scheduler_type"),
        ({"loraplus_lr_ratio": 16}, "loraplus_lr_ratio"),
        ({"additional_parameters": "--log_prefix=x --lr_scheduler_type A"}, "lr_scheduler_type"),
        ({"sdxl_checkbox": True}, "sdxl_checkbox"),
        ({"LoRA_type": None, "network_dim": None, "network_alpha": None}, "DreamBooth"),
        ({"token_string": "zxc"}, "textual-inversion"),
        ({"sample_sampler": "dpmsingle"}, "sample_sampler"),
        ({"sample_prompts": "meeb --g 3.5"}, "sample_prompts"),
        ({"save_precision": "fp8"}, "save_precision"),
        ({"lr_scheduler": "constant", "lr_warmup": 10}, "lr_warmup"),
        ({"lr_warmup_steps": 100}, "lr_warmup_steps"),
        ({"cache_latents": "yes"}, "cache_latents"),
        ({"v2": "True"}, "v2"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path, capsys, change, named):
    path = tmp_path / "bad.json"
    config = BASE | change
    path.write_text(
        json.dumps({key: value for key, value in config.items() if value is not None}),
        encoding="utf-8",
    )
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


# --------------------------------------------------------------------------- the real configs

DREAMBOOTH = "a kohya_ss DreamBooth config"
# Every SD 1.x config of kohya_ss' presets/lora and test/config: None = it converts, else
# a piece of the one-line refusal (the reason). Some test configs hold another tab's
# settings than their names say (kohya_configs/kohya_ss/README.md).
REAL_OUTCOMES: dict[str, str | None] = {
    "preset-dadaptation": None,
    "preset-iA3-Prodigy-sd15": None,
    "preset-ia3-sd15": None,
    "preset-lion_optimizer": None,
    "preset-loha-sd15": None,
    "preset-lokr-sd15": None,
    "preset-sd15-EDG_LoConOptiSettings": None,
    "preset-sd15-EDG_LoHaOptiSettings": None,
    "preset-sd15-EDG_LoraOptiSettings": None,
    "preset-sd15-LoKR-v1.0": None,
    "preset-sd15-LoKr-v1.1": "train_norm: true trains the norm layers too",
    "preset-sd15-LoKr-v2.0": "--lr_scheduler_type: a scheduler class by name",
    "test-Diag-OFT-AdamW8bit-toml": None,
    "test-DyLoRA-Adafactor-toml": "LyCORIS/DyLoRA: DyLoRA trains every rank",
    "test-LoKR-AdamW8bit-toml": "--lr_scheduler_type: a scheduler class by name",
    "test-Standard-AdamW": DREAMBOOTH,
    "test-Standard-AdamW8bit": None,
    "test-TI-AdamW8bit": "a kohya_ss textual-inversion config",
    "test-TI-AdamW8bit-toml": "a kohya_ss textual-inversion config",
    "test-dreambooth": DREAMBOOTH,
    "test-dreambooth-Adafactor": DREAMBOOTH,
    "test-dreambooth-AdamW": DREAMBOOTH,
    "test-dreambooth-AdamW8bit": "debiased_estimation_loss",  # a Kohya LoCon config
    "test-dreambooth-AdamW8bit-masked_loss-toml": DREAMBOOTH,
    "test-dreambooth-AdamW8bit-toml": DREAMBOOTH,
    "test-dreambooth-DAdaptAdam": DREAMBOOTH,
    "test-dreambooth-Prodigy": DREAMBOOTH,
    "test-finetune-AdamW": "v2 is true (SD 2.x)",
    "test-finetune-AdamW-toml": "a kohya_ss fine-tune config",
    "test-iA3-Prodigy": None,
    "test-locon-Adafactor": None,
    "test-locon-AdamW": None,
    "test-locon-AdamW8bit": None,
    "test-locon-AdamW8bit-masked_loss-toml": "masked_loss: true: weights the loss by each",
    "test-locon-AdamW8bit-toml": None,
    "test-locon-Prodigy": None,
}


def test_every_real_config_is_asserted():
    assert {p.stem for p in REAL.glob("*.json")} == set(REAL_OUTCOMES)
    converted = [name for name, reason in REAL_OUTCOMES.items() if reason is None]
    assert (len(REAL_OUTCOMES), len(converted)) == (36, 18)


@pytest.mark.parametrize("name", sorted(REAL_OUTCOMES))
def test_real_kohya_ss_configs(tmp_path, capsys, name):
    """Each real config converts to a recipe that loads (with the preset's blanks filled
    in), or is refused in one line for the reason asserted."""
    config = REAL / f"{name}.json"
    reason = REAL_OUTCOMES[name]
    if reason is None:
        result = import_kohya(config)
        assert all("\n" not in note for note in result.notes)
        recipe = imported(tmp_path, config)
        assert recipe.network.algo in ("lora", "locon", "loha", "lokr", "ia3", "diag-oft")
        return
    with pytest.raises(MeebsError) as error:
        import_kohya(config)
    assert reason in str(error.value) and "\n" not in str(error.value)
    assert main(["import-kohya", str(config)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_preset_leaves_model_and_images_to_fill_in(tmp_path, capsys):
    result = import_kohya(REAL / "preset-loha-sd15.json")
    assert result.fill_in == ("model.path", "data.train_dir")
    assert "  path: null  # fill in: an SD 1.5 checkpoint" in result.text
    assert "  train_dir: ''  # fill in: the folder" in result.text
    notes = "\n".join(result.notes)
    assert "fill in model.path" in notes and "fill in data.train_dir" in notes
    recipe_file = tmp_path / "preset.yaml"
    recipe_file.write_text(result.text, encoding="utf-8")
    for command in ("plan", "train"):  # one line each, before anything is read or trained
        assert main([command, str(recipe_file)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "model" in err and "\n" not in err
        assert main([command, str(recipe_file), "model.builtin=tiny"]) == 2
        err = capsys.readouterr().err.strip()
        assert "data.train_dir" in err and "\n" not in err
    recipe = imported(tmp_path, REAL / "preset-loha-sd15.json")
    assert (recipe.network.algo, recipe.network.dim, recipe.network.alpha) == ("loha", 32, 16)
    assert (recipe.network.conv_dim, recipe.network.use_tucker) == (8, True)  # use_cp
    assert recipe.output.name == "last"  # sd-scripts' name for an empty output_name


def test_values_kohya_accepts_become_the_nearest_meebs_allows(tmp_path):
    result = import_kohya(REAL / "preset-loha-sd15.json")
    assert "bucket_reso_steps 1 became 8" in "\n".join(result.notes)
    assert imported(tmp_path, REAL / "preset-loha-sd15.json").data.bucket_reso_steps == 8
    result = import_kohya(REAL / "preset-sd15-EDG_LoConOptiSettings.json")
    assert "max_resolution '512,650' became 512,648" in "\n".join(result.notes)
    assert imported(tmp_path, REAL / "preset-sd15-EDG_LoConOptiSettings.json").data.resolution == [
        512,
        648,
    ]
    path = tmp_path / "steps.json"
    path.write_text(
        json.dumps(
            BASE | {"bucket_reso_steps": 60, "min_bucket_reso": 250, "max_bucket_reso": 1000}
        ),
        encoding="utf-8",
    )
    data = imported(tmp_path, path).data  # 60 -> 64; min down, max up, as sd-scripts rounds
    assert (data.bucket_reso_steps, data.min_bucket_reso, data.max_bucket_reso) == (64, 192, 1024)


def test_lokr_above_meebs_dims_is_full_matrix(tmp_path):
    result = import_kohya(REAL / "preset-sd15-LoKR-v1.0.json")
    net = imported(tmp_path, REAL / "preset-sd15-LoKR-v1.0.json").network
    assert (net.algo, net.factor, net.full_matrix, net.decompose_both) == ("lokr", 6, True, False)
    assert any("full_matrix: true" in note for note in result.notes)
    net = imported(tmp_path, REAL / "preset-lokr-sd15.json").network  # dim 64: as it is
    assert (net.algo, net.dim, net.conv_dim, net.factor, net.full_matrix) == (
        "lokr",
        64,
        64,
        -1,
        False,
    )
    assert imported(tmp_path, REAL / "preset-sd15-LoKR-v1.0.json").train.optimizer_args == {
        "weight_decay": 0.1,  # '"weight_decay=0.1" "betas=0.9,0.99"': the GUI drops the '"'
        "betas": [0.9, 0.99],
    }


def test_real_lycoris_types(tmp_path):
    result = import_kohya(REAL / "test-Diag-OFT-AdamW8bit-toml.json")
    recipe = imported(tmp_path, REAL / "test-Diag-OFT-AdamW8bit-toml.json")
    assert (recipe.network.algo, recipe.network.dim, recipe.network.conv_dim) == ("diag-oft", 32, 8)
    notes = "\n".join(result.notes)
    assert "dataset_config" in notes and "fill in data.train_dir" in notes
    assert "not used by LoRA_type LyCORIS/Diag-OFT" in notes and "bypass_mode=true" in notes
    result = import_kohya(REAL / "preset-ia3-sd15.json")
    assert imported(tmp_path, REAL / "preset-ia3-sd15.json").network.algo == "ia3"
    notes = "\n".join(result.notes)
    assert "train_on_input true" in notes and "has no ranks" in notes
    result = import_kohya(REAL / "preset-lion_optimizer.json")  # no LoRA_type, no optimizer
    recipe = imported(tmp_path, REAL / "preset-lion_optimizer.json")
    assert (recipe.network.algo, recipe.network.conv_dim, recipe.train.optimizer) == (
        "lora",
        0,
        "AdamW",
    )
    assert any("use_8bit_adam" in note for note in result.notes)
    result = import_kohya(REAL / "test-Standard-AdamW8bit.json")
    assert any(
        "regularisers" in note and "rank_dropout=0.1" in note and "network_dropout=0.1" in note
        for note in result.notes
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"LoRA_type": "LyCORIS/GLoRA"}, {"algo": "glora", "dim": 4, "conv_dim": 4}),
        ({"LoRA_type": "LyCORIS/Native Fine-Tuning"}, {"algo": "full"}),
        ({"LoRA_type": "LoCon"}, {"algo": "locon"}),  # the GUI's old name
        (
            {"LoRA_type": "LyCORIS/LoCon", "dora_wd": True, "use_scalar": "True"},
            {"algo": "locon", "dora_wd": True, "use_scalar": True},
        ),
        ({"LoRA_type": "LyCORIS/LoHa", "dora_wd": True}, {"algo": "loha", "dora_wd": True}),
        (
            {"LoRA_type": "LyCORIS/LoKr", "factor": 8, "decompose_both": True, "dora_wd": True},
            {"algo": "lokr", "factor": 8, "decompose_both": True, "dora_wd": True},
        ),
        (
            {"LoRA_type": "LyCORIS/Diag-OFT", "constrain": 0.0001, "rescaled": True},
            {"algo": "diag-oft", "constraint": 0.0001, "rescaled": True},
        ),
        # the GUI passes neither for Standard (networks.lora), nor decompose_both for LoHa
        ({"LoRA_type": "Standard", "dora_wd": True}, {"algo": "lora", "dora_wd": False}),
        ({"decompose_both": True, "rescaled": True}, {"decompose_both": False, "rescaled": False}),
        # lycoris splits a negative factor as -1, factor 0 as 1
        ({"LoRA_type": "LyCORIS/LoKr", "factor": -4}, {"factor": -1}),
        ({"LoRA_type": "LyCORIS/LoKr", "factor": 0}, {"factor": 1}),
        # lycoris ignores use_scalar for OFT; decompose_both does nothing at full matrices
        ({"LoRA_type": "LyCORIS/Diag-OFT", "use_scalar": True}, {"use_scalar": False}),
        (
            {
                "LoRA_type": "LyCORIS/LoKr",
                "network_dim": 100000,
                "conv_dim": 100000,
                "decompose_both": True,
            },
            {"full_matrix": True, "decompose_both": False},
        ),
        # factor -1: every SD 1.5 factor is full from dim 64 on, 1500 trains as 1024 does
        ({"LoRA_type": "LyCORIS/LoKr", "network_dim": 1500}, {"dim": 1024, "full_matrix": False}),
        # lycoris reads a conv_dim of 0 as network_dim
        ({"conv_dim": 0, "conv_alpha": ""}, {"conv_dim": 4, "conv_alpha": 1.0}),
    ],
)
def test_lora_types_and_network_args(tmp_path, change, expected):
    path = tmp_path / "type.json"
    path.write_text(json.dumps(BASE | change), encoding="utf-8")
    network = imported(tmp_path, path).network
    assert {key: getattr(network, key) for key in expected} == expected


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer(tmp_path, optimizer):
    path = tmp_path / "opt.json"
    path.write_text(json.dumps(BASE | {"optimizer": optimizer.lower()}), encoding="utf-8")
    assert imported(tmp_path, path).train.optimizer == optimizer  # kohya's are case-blind


def test_adafactor_scheduler_is_constant(tmp_path):
    path = tmp_path / "adafactor.json"
    change = {
        "optimizer": "Adafactor",
        "optimizer_args": "scale_parameter=True relative_step=True warmup_init=True",
        "lr_scheduler": "adafactor",
        "lr_warmup": 10,
    }
    path.write_text(json.dumps(BASE | change), encoding="utf-8")
    result = import_kohya(path)
    train = imported(tmp_path, path).train
    assert (train.optimizer, train.lr_scheduler, train.lr_warmup) == ("Adafactor", "constant", 0)
    assert train.optimizer_args["relative_step"] is True
    assert any("lr_scheduler adafactor became constant" in note for note in result.notes)


@pytest.mark.parametrize(
    "config",
    [*FIXTURES, *(REAL / f"{name}.json" for name, why in REAL_OUTCOMES.items() if why is None)],
    ids=lambda p: p.stem,
)
def test_round_trip(tmp_path, config):
    first = imported(tmp_path, config)
    (tmp_path / "filled.yaml").write_text(first.to_yaml(), encoding="utf-8")  # presets filled in
    exported = tmp_path / "exported.json"
    exported.write_text(export_kohya(tmp_path / "filled.yaml").text, encoding="utf-8")
    assert imported(tmp_path, exported, "again.yaml") == first


def test_export_says_how_kohya_trains_the_same_dora(tmp_path):
    path = tmp_path / "r.yaml"
    demo = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    path.write_text(f"extends: {demo}\nnetwork:\n  dora_wd: true\n", encoding="utf-8")
    result = export_kohya(path)
    assert json.loads(result.text)["dora_wd"] is True
    assert any("wd_on_output=False" in note for note in result.notes)
