"""Sampler names, kohya prompt lines and a seeded pipeline run on a tiny SD 1.5-shaped model."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextModel

from meebs.errors import RecipeError
from meebs.models.builtin_models import build_tiny
from meebs.models.sampling import (
    SAMPLERS,
    SamplePrompt,
    generate_samples,
    make_scheduler,
    normalize_sampler,
    parse_kohya_prompt,
    read_prompt_file,
    sample_file_name,
)
from meebs.models.text_encoding import encode, tokenize

DEFAULTS = SamplePrompt(
    prompt="", negative="ugly", width=64, height=64, seed=1, steps=2, cfg=7.0, sampler="Euler a"
)


@pytest.mark.parametrize(
    ("name", "scheduler_class", "karras"),
    [
        ("Euler a", EulerAncestralDiscreteScheduler, None),
        ("Euler", EulerDiscreteScheduler, False),
        ("DDIM", DDIMScheduler, None),
        ("DPM++ 2M", DPMSolverMultistepScheduler, False),
        ("DPM++ 2M Karras", DPMSolverMultistepScheduler, True),
        ("PLMS", PNDMScheduler, None),
        ("PNDM", PNDMScheduler, None),
        ("Heun", HeunDiscreteScheduler, False),
        ("DPM2", KDPM2DiscreteScheduler, False),
        ("KDPM2", KDPM2DiscreteScheduler, False),
        ("UniPC", UniPCMultistepScheduler, False),
    ],
)
def test_sampler_names_build_their_scheduler(name, scheduler_class, karras):
    scheduler = make_scheduler(name)
    assert type(scheduler) is scheduler_class
    assert scheduler.config.get("use_karras_sigmas") == karras
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.steps_offset == 1


def test_ddim_and_pndm_keep_the_sd15_final_alpha_and_no_clipping():
    assert make_scheduler("DDIM").config.set_alpha_to_one is False
    assert make_scheduler("DDIM").config.clip_sample is False
    assert make_scheduler("PLMS").config.set_alpha_to_one is False
    assert "set_alpha_to_one" not in make_scheduler("Euler").config


def test_lms_needs_scipy():
    if importlib.util.find_spec("scipy") is None:
        with pytest.raises(RecipeError, match="'LMS' needs the package 'scipy'"):
            make_scheduler("LMS")
    else:
        assert type(make_scheduler("k_lms")).__name__ == "LMSDiscreteScheduler"


@pytest.mark.parametrize(
    ("kohya", "a1111"),
    [
        ("euler_a", "Euler a"),
        ("k_euler_a", "Euler a"),
        ("ddim", "DDIM"),
        ("dpmsolver++", "DPM++ 2M"),
        ("k_dpm_2", "DPM2"),
        ("pndm", "PLMS"),
        ("lms", "LMS"),
        ("k_euler", "Euler"),
        ("euler", "Euler"),
        ("heun", "Heun"),
        ("dpm++ 2m karras", "DPM++ 2M Karras"),
        ("Euler a", "Euler a"),
    ],
)
def test_kohya_names_map_to_a1111_names(kohya, a1111):
    assert normalize_sampler(kohya) == a1111


def test_unknown_sampler_lists_the_allowed_names():
    with pytest.raises(RecipeError, match=re.escape("unknown sampler 'DPM++ 9M'")) as error:
        make_scheduler("DPM++ 9M")
    message = str(error.value)
    assert "\n" not in message
    for name in SAMPLERS:
        assert repr(name) in message
    assert "euler_a" in message


def test_kohya_prompt_line_sets_every_flag():
    line = "a drawing of meeb --n lowres, bad hands --w 96 --h 48 --d 5 --s 20 --l 7.5 --ss k_euler"
    assert parse_kohya_prompt(line, DEFAULTS) == SamplePrompt(
        prompt="a drawing of meeb",
        negative="lowres, bad hands",
        width=96,
        height=48,
        seed=5,
        steps=20,
        cfg=7.5,
        sampler="Euler",
    )


def test_kohya_prompt_line_keeps_defaults_for_missing_flags():
    parsed = parse_kohya_prompt("  meeb, waving --d 9  ", DEFAULTS)
    assert parsed == SamplePrompt(**{**vars(DEFAULTS), "prompt": "meeb, waving", "seed": 9})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("meeb --s abc", r"sample prompt 'meeb': --s 'abc' is not an integer step count"),
        ("meeb --l high", r"sample prompt 'meeb': --l 'high' is not a number"),
        ("meeb --w 60", r"sample prompt 'meeb': width \(--w\) 60 must be a positive multiple of 8"),
        ("meeb --h 0", r"height \(--h\) 0 must be a positive multiple of 8"),
        ("meeb --s 0", r"steps \(--s\) 0 must be between 1 and 1000"),
        ("meeb --x 1", r"unknown flag --x; allowed: --n --w --h --d --s --l --ss"),
        ("meeb --ss warp", r"sample prompt 'meeb': unknown sampler 'warp'"),
        ("--w 64", r"has no prompt"),
    ],
)
def test_malformed_prompt_line_names_prompt_and_flag(line, message):
    with pytest.raises(RecipeError, match=message):
        parse_kohya_prompt(line, DEFAULTS)


def test_prompt_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# samples\n\nmeeb --w 64\n  # indented comment\n  person  \n", "utf-8")
    assert read_prompt_file(path) == ["meeb --w 64", "person"]


def test_missing_prompt_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


def test_sample_file_names_carry_epoch_step_and_index():
    assert sample_file_name("meeb", 3, 120, 1) == "meeb_e000003_s000120_01.png"


@pytest.fixture(scope="module")
def tiny_sd():
    """The built-in tiny SD 1.5-shaped model (random, fixed weights), real CLIP tokenizer."""
    return build_tiny()


def _generate(model, prompts, clip_skip=1):
    return generate_samples(
        model,
        prompts=prompts,
        device="cpu",
        dtype=torch.float32,
        clip_skip=clip_skip,
    )


def _prompt(seed: int, sampler: str = "Euler a") -> SamplePrompt:
    return parse_kohya_prompt(f"a meeb, waving --d {seed} --ss {sampler}", DEFAULTS)


def test_samples_are_seeded_images_of_the_asked_size(tiny_sd):
    first, again, other = _generate(tiny_sd, [_prompt(5), _prompt(5), _prompt(6)])
    assert (first.size, first.mode) == ((64, 64), "RGB")
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    (later,) = _generate(tiny_sd, [_prompt(5)])
    assert np.array_equal(np.asarray(first), np.asarray(later))


def test_sampling_leaves_rng_state_and_model_modes_alone(tiny_sd):
    tiny_sd.unet.train()
    tiny_sd.text_encoder.train()
    tiny_sd.vae.eval()
    rng_before = torch.random.get_rng_state()
    _generate(tiny_sd, [_prompt(5, "DPM++ 2M Karras")])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert tiny_sd.unet.training and tiny_sd.text_encoder.training
    assert not tiny_sd.vae.training


@pytest.mark.parametrize(
    "sampler",
    [name for name, spec in SAMPLERS.items() if importlib.util.find_spec(spec.requires or "torch")],
)
def test_every_sampler_runs_in_the_pipeline(tiny_sd, sampler):
    prompt = parse_kohya_prompt(f"a meeb --s 1 --ss {sampler}", DEFAULTS)
    (image,) = _generate(tiny_sd, [prompt])
    assert image.size == (64, 64)


def test_clip_skip_reaches_the_samples(tiny_sd):
    (last_layer,) = _generate(tiny_sd, [_prompt(5)], clip_skip=1)
    (skip_one,) = _generate(tiny_sd, [_prompt(5)], clip_skip=2)
    assert not np.array_equal(np.asarray(last_layer), np.asarray(skip_one))


class _WithTextModel(torch.nn.Module):
    """transformers 4's layout (`.text_model`), which diffusers' clip-skip path expects."""

    def __init__(self, text_encoder: CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_encoder
        self.config = text_encoder.config

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


@pytest.mark.parametrize(("kohya", "diffusers"), [(1, None), (2, 1)])
def test_kohya_clip_skip_is_diffusers_clip_skip_plus_one(tiny_sd, kohya, diffusers):
    pipeline = StableDiffusionPipeline(
        vae=tiny_sd.vae,
        text_encoder=_WithTextModel(tiny_sd.text_encoder),
        tokenizer=tiny_sd.tokenizer,
        unet=tiny_sd.unet,
        scheduler=make_scheduler("Euler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        theirs, _ = pipeline.encode_prompt(
            "a meeb", "cpu", 1, do_classifier_free_guidance=False, clip_skip=diffusers
        )
        ours = encode(
            tiny_sd.text_encoder, tokenize(tiny_sd.tokenizer, ["a meeb"], 75, False), kohya
        )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
