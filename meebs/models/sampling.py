"""Sample images: named samplers, kohya prompt lines and a seeded, side-effect-free pipeline run.

Samples during training must not disturb the run they observe: the global RNG state and the
train/eval mode of every model are the same after `generate_samples` as before, so a run with
samples and one without train identical weights. Sampler names follow AUTOMATIC1111 ("Euler a",
"DPM++ 2M Karras"), the names users see in the UI they will load the adapter into; kohya's
lowercase names are accepted and translated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from meebs.errors import RecipeError, quoted
from meebs.files.text_files import read_text, shown
from meebs.models.text_encoding import encode, tokenize
from meebs.recipe.schema import Recipe

if TYPE_CHECKING:
    from meebs.models.base import BaseModel

# The SD 1.5 training schedule; every sampler must walk the same noise levels it was trained on.
SD15_SCHEDULE: Mapping[str, object] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
    }
)


class SamplerSpec(NamedTuple):
    """How to build one sampler: the diffusers class, its options on top of `SD15_SCHEDULE`."""

    scheduler: type[SchedulerMixin]
    options: Mapping[str, object] = MappingProxyType({})
    requires: str | None = None  # an optional package diffusers needs for this scheduler


_DDIM_PNDM = {"set_alpha_to_one": False}

SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType(
    {
        "Euler a": SamplerSpec(EulerAncestralDiscreteScheduler),
        "Euler": SamplerSpec(EulerDiscreteScheduler),
        "LMS": SamplerSpec(LMSDiscreteScheduler, requires="scipy"),
        "Heun": SamplerSpec(HeunDiscreteScheduler, {"clip_sample": False}),
        "DPM2": SamplerSpec(KDPM2DiscreteScheduler),
        "DPM2 a": SamplerSpec(KDPM2AncestralDiscreteScheduler),
        "DPM++ 2M": SamplerSpec(DPMSolverMultistepScheduler),
        "DPM++ 2M Karras": SamplerSpec(DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "DPM++ 2M SDE": SamplerSpec(
            DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}
        ),
        "DPM++ 2M SDE Karras": SamplerSpec(
            DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ),
        "DDIM": SamplerSpec(DDIMScheduler, {**_DDIM_PNDM, "clip_sample": False}),
        # skip_prk_steps as in SD 1.5's own scheduler config: PNDM without its Runge-Kutta
        # warm-up is the PLMS sampler.
        "PLMS": SamplerSpec(PNDMScheduler, {**_DDIM_PNDM, "skip_prk_steps": True}),
        "UniPC": SamplerSpec(UniPCMultistepScheduler),
    }
)

# kohya sd-scripts' `--sample_sampler` names (and other spellings) -> AUTOMATIC1111 names.
# kohya's "dpmsolver" and "dpmsingle" have no AUTOMATIC1111 counterpart and stay unknown.
SAMPLER_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "euler_a": "Euler a",
        "k_euler_a": "Euler a",
        "euler": "Euler",
        "k_euler": "Euler",
        "lms": "LMS",
        "k_lms": "LMS",
        "heun": "Heun",
        "dpm_2": "DPM2",
        "k_dpm_2": "DPM2",
        "kdpm2": "DPM2",
        "dpm_2_a": "DPM2 a",
        "k_dpm_2_a": "DPM2 a",
        "dpmsolver++": "DPM++ 2M",
        "ddim": "DDIM",
        "pndm": "PLMS",
    }
)


def _allowed_sampler_names() -> str:
    return ", ".join(repr(name) for name in SAMPLERS)


def normalize_sampler(name: str) -> str:
    """Return the AUTOMATIC1111 name for `name` (an A1111 name in any case, or a kohya alias)."""
    key = name.strip()
    if key in SAMPLERS:
        return key
    by_lower = {canonical.lower(): canonical for canonical in SAMPLERS} | dict(SAMPLER_ALIASES)
    if key.lower() in by_lower:
        return by_lower[key.lower()]
    raise RecipeError(
        f"unknown sampler {quoted(name)}; allowed: {_allowed_sampler_names()} "
        f"(or kohya's {', '.join(SAMPLER_ALIASES)})"
    )


def make_scheduler(name: str) -> SchedulerMixin:
    """Build a fresh scheduler for the sampler `name` on the SD 1.5 noise schedule."""
    canonical = normalize_sampler(name)
    spec = SAMPLERS[canonical]
    if spec.requires and importlib.util.find_spec(spec.requires) is None:
        raise RecipeError(
            f"sampler {canonical!r} needs the package {spec.requires!r}, which is not installed; "
            f"choose another sampler: {_allowed_sampler_names()}"
        )
    return spec.scheduler(**SD15_SCHEDULE, **spec.options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplePrompt:
    """One sample image to draw; validated on creation so a bad prompt fails before training."""

    prompt: str
    negative: str = ""
    width: int
    height: int
    seed: int
    steps: int
    cfg: float
    sampler: str

    def __post_init__(self) -> None:
        where = f"sample prompt {quoted(self.prompt)}"
        for field, size in (("width (--w)", self.width), ("height (--h)", self.height)):
            if size <= 0 or size % 8:
                raise RecipeError(
                    f"{where}: {field} {quoted(size)} must be a positive multiple of 8"
                )
        if not 1 <= self.steps <= 1000:
            raise RecipeError(
                f"{where}: steps (--s) {quoted(self.steps)} must be between 1 and 1000"
            )
        if not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise RecipeError(f"{where}: cfg (--l) {quoted(self.cfg)} must be a number >= 0")
        if not 0 <= self.seed < 2**64:  # torch.Generator.manual_seed's range
            raise RecipeError(
                f"{where}: seed (--d) {quoted(self.seed)} must be between 0 and 2**64 - 1"
            )
        try:
            sampler = normalize_sampler(self.sampler)
        except RecipeError as error:
            raise RecipeError(f"{where}: {error}") from None
        object.__setattr__(self, "sampler", sampler)  # A1111 names are canonical everywhere


# kohya's prompt flags: flag -> (SamplePrompt field, value parser, description for errors).
_FLAGS: Mapping[str, tuple[str, type, str]] = MappingProxyType(
    {
        "n": ("negative", str, "a negative prompt"),
        "w": ("width", int, "an integer width"),
        "h": ("height", int, "an integer height"),
        "d": ("seed", int, "an integer seed"),
        "s": ("steps", int, "an integer step count"),
        "l": ("cfg", float, "a number (CFG scale)"),
        "ss": ("sampler", str, "a sampler name"),
    }
)
_FLAG_SPLIT = re.compile(r"(?:^|\s)--(?=[A-Za-z])")


def parse_kohya_prompt(line: str, defaults: SamplePrompt) -> SamplePrompt:
    """Parse one line of a kohya prompt file; flags not on the line keep `defaults`' values.

    Syntax: `a drawing of meeb --n lowres, bad --w 64 --h 64 --d 5 --s 20 --l 7.5 --ss euler_a`.
    Like kohya, a flag starts at " --" followed by a letter and runs to the next flag, so a
    negative prompt may contain commas. `defaults.prompt` is ignored. Unlike kohya, which
    skips flags it cannot read and clamps --s, a bad, out-of-range or unknown flag (kohya's
    --cn and --g have no use in SD 1.5) is an error: a silent default would make the
    samples quietly differ from what the user asked for.
    """
    prompt, *flags = _FLAG_SPLIT.split(line.strip())
    prompt = prompt.strip()
    if not prompt:
        raise RecipeError(
            f"sample prompt line {quoted(line.strip())} has no prompt before its flags"
        )
    values: dict[str, object] = {"prompt": prompt}
    for flag_text in flags:
        flag, _, raw = flag_text.strip().partition(" ")
        field, parse, wanted = _flag_spec(prompt, flag.lower())
        try:
            values[field] = parse(raw.strip())
        except ValueError:
            raise RecipeError(
                f"sample prompt {quoted(prompt)}: --{shown(flag)} {quoted(raw)} is not {wanted}"
            ) from None
    return dataclasses.replace(defaults, **values)


def _flag_spec(prompt: str, flag: str) -> tuple[str, type, str]:
    if flag not in _FLAGS:
        allowed = " ".join(f"--{name}" for name in _FLAGS)
        raise RecipeError(
            f"sample prompt {quoted(prompt)}: unknown flag --{shown(flag)}; allowed: {allowed}"
        )
    return _FLAGS[flag]


def read_prompt_file(path: Path | str) -> list[str]:
    """Return the prompt lines of a kohya prompt file, without blank lines and '#' comments."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"sample prompt file {str(path)!r} does not exist; give an existing file")
    text = read_text(path, "sample prompt file", RecipeError)
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def sample_file_name(output_name: str, epoch: int, step: int, index: int) -> str:
    """Name a sample so a folder listing sorts by epoch, then step, then prompt."""
    return f"{output_name}_e{epoch:06d}_s{step:06d}_{index:02d}.png"


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Switch `modules` to eval (no dropout) and give each its own previous mode back after."""
    was_training = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)


def generate_samples(
    model: BaseModel,
    *,
    prompts: list[SamplePrompt],
    device: torch.device | str,
    dtype: torch.dtype,
    clip_skip: int = 1,
    max_token_length: int = 75,
) -> list[Image.Image]:
    """Draw one image per prompt, leaving the RNG state and the models' modes untouched.

    The starting noise comes from a CPU generator seeded with the prompt's seed, so a seed
    gives the same image on any device. `dtype` is the training compute dtype: anything but
    float32 runs the pipeline under autocast to it, as the training step does.

    Prompts are encoded by `meebs.models.text_encoding`, exactly as captions are in training, and
    handed to the pipeline as embeddings. `clip_skip` counts the kohya/A1111 way (1 = last
    layer); diffusers' own `clip_skip` argument counts one lower (its None is our 1, its 1 is
    our 2) and reaches for `text_encoder.text_model`, which transformers 5's CLIPTextModel
    no longer has.
    """
    if not prompts:
        return []
    pipeline, embed = _pipeline(model, prompts[0].sampler, device, clip_skip, max_token_length)
    with _quiet_sampling(model, device, dtype):
        return [_draw(pipeline, prompt, embed) for prompt in prompts]


def draw_batch(
    model: BaseModel,
    prompt: SamplePrompt,
    seeds: list[int],
    *,
    device: torch.device | str,
    clip_skip: int = 1,
    max_token_length: int = 75,
) -> torch.Tensor:
    """`prompt` drawn once per seed in one batch (fp32), as images in [-1, 1] shaped
    (N, 3, H, W): what the verdict scores 32 seeds of per prompt and epoch.

    Each seed gets its own CPU generator for the starting and the ancestral noise, so an
    image depends on its seed only, not on the batch it was drawn in.
    """
    pipeline, embed = _pipeline(model, prompt.sampler, device, clip_skip, max_token_length)
    with _quiet_sampling(model, device, torch.float32):
        count = len(seeds)
        result = pipeline(
            prompt_embeds=embed(prompt.prompt).expand(count, -1, -1),
            negative_prompt_embeds=embed(prompt.negative).expand(count, -1, -1),
            width=prompt.width,
            height=prompt.height,
            num_inference_steps=prompt.steps,
            guidance_scale=prompt.cfg,
            generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
            output_type="pt",
        )
    return result.images.mul(2).sub(1).cpu()


def _pipeline(
    model: BaseModel,
    sampler: str,
    device: torch.device | str,
    clip_skip: int,
    max_token_length: int,
) -> tuple[StableDiffusionPipeline, Callable[[str], torch.Tensor]]:
    """A pipeline around the model's parts, and the prompt encoder training uses."""
    unet, vae, text_encoder, tokenizer = model.unet, model.vae, model.text_encoder, model.tokenizer
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)

    def embed(text: str) -> torch.Tensor:
        ids = tokenize(tokenizer, [text], max_token_length, pad_to_longest=False)
        return encode(text_encoder, ids.to(device), clip_skip)

    return pipeline, embed


@contextlib.contextmanager
def _quiet_sampling(
    model: BaseModel, device: torch.device | str, dtype: torch.dtype
) -> Iterator[None]:
    """No grad, eval mode, autocast to `dtype` unless fp32, and the RNG state restored."""
    autocast = torch.autocast(
        torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32
    )
    parts = (model.unet, model.vae, model.text_encoder)
    with torch.random.fork_rng(), torch.no_grad(), _eval_mode(*parts), autocast:
        yield


def _draw(
    pipeline: StableDiffusionPipeline,
    prompt: SamplePrompt,
    embed: Callable[[str], torch.Tensor],
) -> Image.Image:
    pipeline.scheduler = make_scheduler(prompt.sampler)  # fresh: multistep samplers keep state
    result = pipeline(
        prompt_embeds=embed(prompt.prompt),
        negative_prompt_embeds=embed(prompt.negative),
        width=prompt.width,
        height=prompt.height,
        num_inference_steps=prompt.steps,
        guidance_scale=prompt.cfg,
        generator=torch.Generator(device="cpu").manual_seed(prompt.seed),
        output_type="pil",
    )
    return result.images[0]


def recipe_prompts(recipe: Recipe) -> list[SamplePrompt]:
    """The recipe's sample prompts (inline, then the prompt file), each with its own seed."""
    sample = recipe.sample
    lines = list(sample.prompts)
    if sample.prompt_file:
        lines += read_prompt_file(sample.prompt_file)
    width, height = recipe.data.resolution
    return [
        parse_kohya_prompt(
            line,
            SamplePrompt(
                prompt="",
                negative=sample.negative,
                width=width,
                height=height,
                seed=sample.seed + index,
                steps=sample.steps,
                cfg=sample.cfg,
                sampler=sample.sampler,
            ),
        )
        for index, line in enumerate(lines)
    ]
