"""Base model building, hashing, safety gates, architecture checks and loading round trips.

Nothing here builds the full-size SD 1.5 model: single-file loading is exercised end to
end with the tiny configs, by writing the tiny model in the LDM key layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from meebs.errors import ModelError
from meebs.interop.ldm_export import ldm_state_dict
from meebs.models import builtin_models, single_file
from meebs.models.base import (
    SD15_CONFIGS,
    TINY_CONFIGS,
    BaseModel,
    describe_base,
    noise_scheduler,
    sha256_file,
    state_dict_sha256,
)
from meebs.models.builtin_models import build_tiny
from meebs.models.loading import load_base_model

SD1_TO_K = single_file.CROSS_ATTENTION_KEY
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SD1_VAE_KEY = "first_stage_model.encoder.conv_in.weight"


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return build_tiny()


def _outputs(model: BaseModel) -> dict[str, torch.Tensor]:
    """Deterministic outputs of all three parts, to compare two loads of the same weights."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = model.tokenizer(
        ["a drawing of meeb person", "meeb"],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        text = model.text_encoder(ids).last_hidden_state
        return {
            "text": text,
            "latent_mean": model.vae.encode(image).latent_dist.mean,
            "noise_pred": model.unet(latents, torch.tensor([10, 500]), text).sample,
        }


def _assert_same_outputs(first: BaseModel, second: BaseModel) -> None:
    for name, expected in _outputs(first).items():
        torch.testing.assert_close(_outputs(second)[name], expected, rtol=0, atol=0, msg=name)


# Built-ins


def test_tiny_is_frozen_fp32_with_the_real_tokenizer(tiny: BaseModel) -> None:
    for part in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not part.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in part.parameters())
    assert len(tiny.tokenizer) == 49408
    assert (tiny.name, tiny.source, tiny.legacy_hash) == ("tiny", "builtin:tiny", None)
    assert re.fullmatch(r"[0-9a-f]{64}", tiny.sha256)
    assert tiny.noise_scheduler.config.num_train_timesteps == 1000


def test_tiny_is_deterministic_and_hashed_by_its_weights(tiny: BaseModel) -> None:
    assert build_tiny(0).sha256 == tiny.sha256
    other = build_tiny(1)
    assert other.sha256 != tiny.sha256
    before = state_dict_sha256({"unet": other.unet})
    with torch.no_grad():
        other.unet.conv_in.bias[0] += 1
    assert state_dict_sha256({"unet": other.unet}) != before


def test_build_tiny_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    build_tiny(7)
    assert torch.equal(torch.get_rng_state(), before)


def test_tiny_forward_shapes(tiny: BaseModel) -> None:
    outputs = _outputs(tiny)
    assert tuple(outputs["latent_mean"].shape) == (1, 4, 8, 8)
    assert tuple(outputs["text"].shape) == (2, 77, 32)
    assert tuple(outputs["noise_pred"].shape) == (2, 4, 8, 8)
    assert tiny.vae.config.scaling_factor == pytest.approx(0.18215)


def test_load_builtin_and_its_pin(tiny: BaseModel) -> None:
    loaded = load_base_model(builtin="tiny", path=None, sha256=tiny.sha256, allow_pickle=False)
    assert loaded.sha256 == tiny.sha256
    with pytest.raises(ModelError, match="the recipe pins"):
        load_base_model(builtin="tiny", path=None, sha256="0" * 64, allow_pickle=False)
    with pytest.raises(ModelError, match=r"unknown model\.builtin 'sd14'"):
        load_base_model(builtin="sd14", path=None, sha256=None, allow_pickle=False)
    with pytest.raises(ModelError, match="exactly one"):
        load_base_model(builtin="tiny", path=Path("x"), sha256=None, allow_pickle=False)


def test_noise_scheduler_is_the_sd15_training_schedule() -> None:
    config = noise_scheduler().config
    assert config.num_train_timesteps == 1000
    assert config.beta_schedule == "scaled_linear"
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.prediction_type == "epsilon"
    assert config.clip_sample is False


def test_shipped_sd15_configs_match_reference() -> None:
    def read(part: str, name: str = "config.json") -> dict:
        return json.loads((SD15_CONFIGS / part / name).read_text())

    unet = read("unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert (unet["layers_per_block"], unet["attention_head_dim"]) == (2, 8)
    assert (unet["cross_attention_dim"], unet["sample_size"]) == (768, 64)
    assert (unet["in_channels"], unet["out_channels"], unet["norm_num_groups"]) == (4, 4, 32)
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet["act_fn"], unet["flip_sin_to_cos"], unet["freq_shift"]) == ("silu", True, 0)
    text = read("text_encoder")
    assert (text["vocab_size"], text["hidden_size"], text["num_hidden_layers"]) == (49408, 768, 12)
    assert (text["num_attention_heads"], text["max_position_embeddings"]) == (12, 77)
    assert (text["hidden_act"], text["bos_token_id"], text["eos_token_id"]) == (
        "quick_gelu",
        49406,
        49407,
    )
    vae = read("vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512]
    assert (vae["latent_channels"], vae["scaling_factor"]) == (4, 0.18215)
    scheduler = read("scheduler", "scheduler_config.json")
    assert scheduler["_class_name"] == "DDPMScheduler"
    assert "set_alpha_to_one" not in scheduler


def test_sd15_random_hash_depends_on_the_seed_without_building() -> None:
    first = builtin_models._recipe_sha256("sd15-random", 0, SD15_CONFIGS)
    assert first == builtin_models._recipe_sha256("sd15-random", 0, SD15_CONFIGS)
    assert first != builtin_models._recipe_sha256("sd15-random", 1, SD15_CONFIGS)


def test_describe_base_is_one_line(tiny: BaseModel) -> None:
    line = describe_base(tiny)
    assert "\n" not in line
    assert "tiny" in line and tiny.sha256[:12] in line and "2.5M" in line


# Safety gates: missing files, pickle, pins


def test_sha256_file_streams(tmp_path: Path) -> None:
    file = tmp_path / "blob"
    file.write_bytes(b"x" * (3 * 1024 * 1024 + 5))
    assert sha256_file(file) == hashlib.sha256(file.read_bytes()).hexdigest()


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.safetensors does not exist"):
        load_base_model(
            builtin=None, path=tmp_path / "nope.safetensors", sha256=None, allow_pickle=False
        )


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_unless_allowed(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, file)
    with pytest.raises(ModelError, match=r"refusing to load pickle file .*model\.allow_pickle"):
        load_base_model(builtin=None, path=file, sha256=None, allow_pickle=False)
    # Allowed, it goes on: hashed against the pin, then read and checked.
    with pytest.raises(ModelError, match="the recipe pins"):
        load_base_model(builtin=None, path=file, sha256="0" * 64, allow_pickle=True)
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint we can read"):
        load_base_model(builtin=None, path=file, sha256=None, allow_pickle=True)


def test_pin_mismatch_fails_before_reading_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(4)}, file)

    def must_not_run(*args: object) -> None:
        raise AssertionError("read the checkpoint before checking the pin")

    monkeypatch.setattr(single_file, "_safetensors_shapes", must_not_run)
    monkeypatch.setattr(single_file, "_read_safetensors", must_not_run)
    pin = "ab" * 32
    message = f"model.safetensors has sha256 {sha256_file(file)}, the recipe pins {pin}"
    with pytest.raises(ModelError, match=message):
        load_base_model(builtin=None, path=file, sha256=pin, allow_pickle=False)


def test_other_suffixes_and_garbage_are_unreadable(tmp_path: Path) -> None:
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint we can read"):
        load_base_model(builtin=None, path=text, sha256=None, allow_pickle=True)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="bad safetensors header"):
        load_base_model(builtin=None, path=garbage, sha256=None, allow_pickle=False)


# Architecture detection from fake single-file headers (tiny tensors, real key names)


def _sd1_header(**overrides: torch.Tensor | None) -> dict[str, torch.Tensor]:
    keys = {
        SD1_TO_K: torch.zeros(320, 768, dtype=torch.float16),
        SD1_TEXT_KEY: torch.zeros(768, dtype=torch.float16),
        SD1_VAE_KEY: torch.zeros(128, 3, 3, 3, dtype=torch.float16),
        single_file.CONV_IN_KEY: torch.zeros(320, 4, 3, 3, dtype=torch.float16),
    }
    keys.update(overrides)
    return {key: value for key, value in keys.items() if value is not None}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2), SD1_TO_K: None},
            "is an SDXL checkpoint",
        ),
        ({"cond_stage_model.model.ln_final.weight": torch.zeros(2)}, "is an SD 2.x checkpoint"),
        ({SD1_TO_K: torch.zeros(320, 1024, dtype=torch.float16)}, "is an SD 2.x checkpoint"),
        (
            {single_file.CONV_IN_KEY: torch.zeros(320, 9, 3, 3, dtype=torch.float16)},
            "inpainting or edit model",
        ),
        ({SD1_VAE_KEY: None}, r"has no VAE weights \(first_stage_model\.\*\)"),
        ({SD1_TEXT_KEY: None}, "has no CLIP text encoder weights"),
        ({SD1_TO_K: None}, "not a Stable Diffusion checkpoint we can read"),
    ],
)
def test_architecture_is_detected_from_the_header(
    tmp_path: Path, tensors: dict, message: str
) -> None:
    file = tmp_path / "fake.safetensors"
    save_file(_sd1_header(**tensors), file)
    with pytest.raises(ModelError, match=message) as caught:
        load_base_model(builtin=None, path=file, sha256=None, allow_pickle=False)
    assert "fake.safetensors" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_sd1_header_goes_on_to_strict_loading(tmp_path: Path) -> None:
    # Detected as SD 1.x, then the SD 1.5 parts (built empty, not initialised) find most
    # weights missing: a strict error, never random weights.
    file = tmp_path / "partial.safetensors"
    save_file(_sd1_header(), file)
    with pytest.raises(ModelError, match=r"partial.safetensors: its UNet weights do not"):
        load_base_model(builtin=None, path=file, sha256=None, allow_pickle=False)


# Single-file SD 1.x checkpoints: the tiny model written in the LDM layout


def _assert_same_weights(first: BaseModel, second: BaseModel) -> None:
    for part in ("unet", "vae", "text_encoder"):
        expected = getattr(first, part).state_dict()
        actual = getattr(second, part).state_dict()
        assert actual.keys() == expected.keys(), part
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), f"{part}.{key}"


@pytest.fixture
def tiny_single_file(
    tiny: BaseModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny model as an SD 1.x-layout .safetensors, with the loader using tiny configs.

    Single files carry no config: the loader builds SD 1.5 from meebs/configs/sd15. Here
    it builds the tiny shapes instead, and accepts the tiny 32-wide cross-attention.
    """
    monkeypatch.setattr(single_file, "SD15_CONFIGS", TINY_CONFIGS)
    monkeypatch.setattr(single_file, "SD1_CONTEXT_WIDTH", tiny.unet.config.cross_attention_dim)
    state = {key: value.contiguous() for key, value in ldm_state_dict(tiny).items()}
    # Extras real checkpoints carry: the EMA copy and the text position ids buffer.
    state["model_ema.decay"] = torch.tensor(0.9999)
    state[single_file.TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    file = tmp_path / "meeb-base.safetensors"
    save_file(state, file)
    return file, state


def test_single_file_sd1_loads_every_weight(
    tiny: BaseModel, tiny_single_file: tuple[Path, dict]
) -> None:
    file, _ = tiny_single_file
    loaded = load_base_model(builtin=None, path=file, sha256=sha256_file(file), allow_pickle=False)
    _assert_same_weights(tiny, loaded)
    _assert_same_outputs(tiny, loaded)
    assert (loaded.name, loaded.source) == ("meeb-base", str(file))
    assert loaded.sha256 == sha256_file(file)
    assert re.fullmatch(r"[0-9a-f]{8}", loaded.legacy_hash or "")
    assert all(not p.requires_grad for p in loaded.unet.parameters())


def test_single_file_pickle_loads_when_allowed(
    tiny: BaseModel, tiny_single_file: tuple[Path, dict], tmp_path: Path
) -> None:
    _, state = tiny_single_file
    file = tmp_path / "meeb-base.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, file)
    loaded = load_base_model(builtin=None, path=file, sha256=None, allow_pickle=True)
    _assert_same_weights(tiny, loaded)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_unet", "its UNet weights do not match SD 1.5 .*1 .e.g. conv_out.bias. missing"),
        ("extra_text", "its text encoder weights do not match SD 1.5 .*unexpected"),
        ("reshape_vae", "its VAE weights do not fit SD 1.5"),
    ],
)
def test_single_file_loading_is_strict(
    tiny_single_file: tuple[Path, dict], tmp_path: Path, change: str, message: str
) -> None:
    _, state = tiny_single_file
    state = dict(state)
    if change == "drop_unet":
        del state[single_file.UNET_PREFIX + "out.2.bias"]
    elif change == "extra_text":
        state[single_file.TEXT_PREFIX + "text_model.extra.weight"] = torch.zeros(1)
    else:
        state[single_file.VAE_PREFIX + "encoder.conv_in.bias"] = torch.zeros(3)
    file = tmp_path / "broken.safetensors"
    save_file(state, file)
    with pytest.raises(ModelError, match=message):
        load_base_model(builtin=None, path=file, sha256=None, allow_pickle=False)


# Diffusers folders


def _save_folder(model: BaseModel, folder: Path, *, safe: bool = True) -> Path:
    model.unet.save_pretrained(folder / "unet", safe_serialization=safe)
    model.vae.save_pretrained(folder / "vae", safe_serialization=safe)
    model.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=safe)
    model.noise_scheduler.save_pretrained(folder / "scheduler")
    return folder


def test_diffusers_folder_round_trip(tiny: BaseModel, tmp_path: Path) -> None:
    folder = _save_folder(tiny, tmp_path / "tiny-diffusers")
    loaded = load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False)
    _assert_same_weights(tiny, loaded)
    _assert_same_outputs(tiny, loaded)
    assert (loaded.name, loaded.legacy_hash) == ("tiny-diffusers", None)
    assert len(loaded.tokenizer) == 49408
    # The hash is stable, pinnable, and follows the weights but not unrelated files.
    again = load_base_model(builtin=None, path=folder, sha256=loaded.sha256, allow_pickle=False)
    assert again.sha256 == loaded.sha256
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"ignored")
    unchanged = load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False)
    assert unchanged.sha256 == loaded.sha256
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae_file)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1
    save_file(state, vae_file)
    with pytest.raises(ModelError, match=f"has sha256 .*, the recipe pins {loaded.sha256}"):
        load_base_model(builtin=None, path=folder, sha256=loaded.sha256, allow_pickle=False)


def test_folder_with_published_text_encoder_layout_and_tokenizer(
    tiny: BaseModel, tmp_path: Path
) -> None:
    # SD 1.5's own folder keeps the `text_model.` level that transformers 5 drops.
    folder = _save_folder(tiny, tmp_path / "published")
    weights = folder / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(weights).items()}, weights)
    tiny.tokenizer.save_pretrained(folder / "tokenizer")
    loaded = load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False)
    _assert_same_outputs(tiny, loaded)
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.tokenizer("a photo of a cat").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
    ]


def test_folder_with_pickle_weights_needs_allow_pickle(tiny: BaseModel, tmp_path: Path) -> None:
    folder = _save_folder(tiny, tmp_path / "pickled", safe=False)
    with pytest.raises(ModelError, match=r"refusing to load pickle file .*unet.*\.bin"):
        load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False)
    loaded = load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=True)
    _assert_same_weights(tiny, loaded)


def test_folder_loading_is_strict(tiny: BaseModel, tmp_path: Path) -> None:
    folder = _save_folder(tiny, tmp_path / "broken")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.bias"]
    save_file(state, weights)
    with pytest.raises(ModelError, match=r"vae does not match its config .*conv_out\.bias"):
        load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False)


@pytest.mark.parametrize(
    ("unet_config", "extra_dir", "message"),
    [
        ({"cross_attention_dim": 2048}, None, "is an SDXL model folder"),
        ({}, "text_encoder_2", "is an SDXL model folder"),
        ({"cross_attention_dim": 1024}, None, "is an SD 2.x model folder"),
        ({"in_channels": 9}, None, "inpainting or edit model"),
        ({"_class_name": "UNet2DModel"}, None, "not a Stable Diffusion checkpoint we can read"),
    ],
)
def test_folder_architecture_is_detected_from_configs(
    tmp_path: Path, unet_config: dict, extra_dir: str | None, message: str
) -> None:
    folder = tmp_path / "other"
    for part, config in (
        ("unet", {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768}),
        ("text_encoder", {"model_type": "clip_text_model", "hidden_size": 768}),
    ):
        (folder / part).mkdir(parents=True)
        if part == "unet":
            config |= unet_config
        (folder / part / "config.json").write_text(json.dumps(config))
    if extra_dir:
        (folder / extra_dir).mkdir()
    with pytest.raises(ModelError, match=message):
        load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False)


def test_folder_without_a_unet_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"not a Stable Diffusion .*no unet/config\.json"):
        load_base_model(builtin=None, path=tmp_path, sha256=None, allow_pickle=False)


def test_loading_draws_no_library_progress_bar(capfd):
    """transformers' own tqdm bar ("Loading weights: 0%|...") cut into the rich output of
    `train`; it is silenced while a part loads, and the libraries' setting restored."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.enable_progress_bar()
    capfd.readouterr()
    load_base_model(builtin="tiny-trained", path=None, sha256=None, allow_pickle=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert diffusers.utils.logging.is_progress_bar_enabled()
