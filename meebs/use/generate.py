"""`generate`: images from a prompt with AUTOMATIC1111's `<lyco:NAME:W>` tags, A1111-style PNGs.

The point is to try a trained network the way it will be used, without starting a UI:
the same prompt syntax, sampler names and PNG "parameters" text, so an image can be
dropped into A1111's PNG Info tab and reproduced there. Everything the user typed is
checked (tags, names, files, sampler, size) before the base model is loaded and before
anything is written; images go to a numbered file each, never over an existing one.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from rich.console import Console
from rich.markup import escape

from meebs.errors import MeebsError, quoted
from meebs.files.atomic_write import make_folder, write_atomic
from meebs.files.safetensors_io import addnet_hash
from meebs.models.base import BaseModel
from meebs.models.loading import load_base_model
from meebs.models.sampling import SamplePrompt, generate_samples, normalize_sampler
from meebs.models.single_file import PICKLE_SUFFIXES
from meebs.network.apply import apply_network
from meebs.network.network_file import check_values, read_network_header
from meebs.use.inspect import clip
from meebs.use.network_lookup import find_network
from meebs.use.prompt_tags import NetworkTag, parse_prompt, weight_warnings

DEFAULT_OUT = Path("outputs") / "generated"
DEFAULT_SIZE = (512, 512)
BUILTIN_PREFIX = "builtin:"
_NUMBERED = re.compile(r"^(\d{5})-")
# What a network's metadata may ask of generate (the recipe's own bounds): anything else
# is a damaged or hostile file, refused rather than guessed around or obeyed.
CLIP_SKIPS = range(1, 13)
MAX_TOKEN_LENGTHS = (75, 150, 225)
RECORDED_SIZES = range(64, 4097, 8)
_SIZE = re.compile(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*")


@dataclass(frozen=True)
class Request:
    """What the user asked for, as typed; `None` means "from the network, else default"."""

    prompt: str
    negative: str = ""
    seed: int | None = None
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "Euler a"
    size: str | None = None
    count: int = 1
    networks: list[Path] = field(default_factory=list)
    outputs: Path = Path("outputs")
    out: Path = DEFAULT_OUT
    model: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Resolved:
    """One network tag and the file it names."""

    tag: NetworkTag
    path: Path
    metadata: dict[str, str]


def generate(request: Request, console: Console) -> list[Path]:
    """Draw `request.count` images (seeds seed, seed+1, ...) and return the files written."""
    text, tags = parse_prompt(request.prompt)
    if parse_prompt(request.negative)[1]:
        raise MeebsError("network tags belong in the prompt, not in --negative")
    if request.count < 1:
        raise MeebsError(f"--count {request.count} must be at least 1")
    for line in weight_warnings(tags):
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    resolved = [_resolve(tag, request, console) for tag in tags]
    seed = random.SystemRandom().randrange(2**32) if request.seed is None else request.seed
    prompts = _prompts(request, text, seed, resolved)
    base = _base_model(request, resolved)
    for item in resolved:
        _warn_other_base(item, base, console)
        apply_network(item.path, base, te=item.tag.te, unet=item.tag.unet)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for part in (base.unet, base.vae, base.text_encoder):
        part.to(device)
    images = generate_samples(
        base,
        prompts=prompts,
        device=device,
        dtype=torch.float32,
        clip_skip=_recorded_int(resolved, "ss_clip_skip", 1, CLIP_SKIPS),
        max_token_length=_recorded_int(resolved, "ss_max_token_length", 75, MAX_TOKEN_LENGTHS),
    )
    hashes = {item.tag.name: addnet_hash(item.path)[:12] for item in resolved}
    make_folder(request.out, "give a writable folder with --out")
    written = []
    for prompt, image in zip(prompts, images, strict=True):
        info = infotext(request.prompt, prompt, base, hashes)
        written.append(_write_png(request.out, prompt.seed, image, info))
        console.print(f"wrote {written[-1]}", highlight=False)
    return written


def infotext(typed_prompt: str, prompt: SamplePrompt, base: BaseModel, hashes: dict) -> str:
    """A1111's "parameters" text: the prompt as typed, the negative line, the settings."""
    settings = {
        "Steps": prompt.steps,
        "Sampler": prompt.sampler,
        "CFG scale": f"{prompt.cfg:g}",
        "Seed": prompt.seed,
        "Size": f"{prompt.width}x{prompt.height}",
        "Model hash": base.sha256[:10],
        "Model": base.name,
    }
    if hashes:
        settings["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in hashes.items())
    lines = [typed_prompt]
    if prompt.negative:
        lines.append(f"Negative prompt: {prompt.negative}")
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in settings.items()))
    return "\n".join(lines)


def _quote(value: str) -> str:
    """A1111's `quote`: JSON-quote a value only when it holds ',', ':' or a newline."""
    return json.dumps(value, ensure_ascii=False) if re.search(r"[,:\n]", value) else value


def _resolve(tag: NetworkTag, request: Request, console: Console) -> Resolved:
    found = find_network(tag.name, [request.outputs, *request.networks])
    if found.candidates > 1:
        console.print(
            f"{tag.text}: {found.candidates} files named {found.path.name}; using the newest, "
            f"{found.path}",
            highlight=False,
        )
    header = read_network_header(found.path)
    check_values(found.path, header)  # a NaN is refused before the base model loads
    return Resolved(tag, found.path, header.metadata)


def _prompts(
    request: Request, text: str, seed: int, resolved: list[Resolved]
) -> list[SamplePrompt]:
    width, height = _size(request.size, resolved)
    return [
        SamplePrompt(
            prompt=text,
            negative=request.negative,
            width=width,
            height=height,
            seed=seed + index,
            steps=request.steps,
            cfg=request.cfg,
            sampler=normalize_sampler(request.sampler),
        )
        for index in range(request.count)
    ]


def _size(size: str | None, resolved: list[Resolved]) -> tuple[int, int]:
    """--size WxH, else the first network's training resolution, else 512x512."""
    if size is not None:
        match = _SIZE.fullmatch(size)
        if not match:
            raise MeebsError(f"--size {quoted(size)}: write WIDTHxHEIGHT, e.g. 512x512")
        return int(match.group(1)), int(match.group(2))
    recorded = resolved[0].metadata.get("modelspec.resolution") if resolved else None
    if recorded is None:
        return DEFAULT_SIZE
    match = _SIZE.fullmatch(recorded)
    sides = (int(match.group(1)), int(match.group(2))) if match else ()
    if not (sides and all(side in RECORDED_SIZES for side in sides)):
        raise MeebsError(
            f"{resolved[0].path}: its modelspec.resolution {quoted(recorded)} is not a size "
            "from 64x64 to 4096x4096 in steps of 8: give --size"
        )
    return sides


def _recorded_int(resolved: list[Resolved], key: str, default: int, allowed: Sequence) -> int:
    """A number the first network's metadata records (kohya's ss_clip_skip...), checked."""
    if not resolved or key not in resolved[0].metadata:
        return default
    text = resolved[0].metadata[key]
    value = int(text) if re.fullmatch(r"\d{1,4}", text) else None
    if value not in allowed:
        choices = (
            f"{allowed[0]} to {allowed[-1]}"
            if isinstance(allowed, range)
            else ", ".join(map(str, allowed))
        )
        raise MeebsError(
            f"{resolved[0].path}: its metadata {key} {quoted(text)} is not one of {choices}: "
            f"the file is damaged; remove the key to use {default}"
        )
    return value


def _base_model(request: Request, resolved: list[Resolved]) -> BaseModel:
    """--model, else the base recorded in the first network's meebs_recipe."""
    if request.model is not None:
        builtin = request.model.removeprefix(BUILTIN_PREFIX)
        is_builtin = request.model.startswith(BUILTIN_PREFIX)
        return load_base_model(
            builtin=builtin if is_builtin else None,
            path=None if is_builtin else Path(request.model),
            sha256=request.sha256,
            allow_pickle=False,
        )
    if not resolved:
        raise MeebsError("no network tag in the prompt: give the base model with --model")
    first = resolved[0]
    if "meebs_recipe" not in first.metadata:
        raise MeebsError(
            f"{first.path} records no meebs recipe, so its base model is unknown: give --model"
        )
    return load_recorded_base(_recorded_model(first), pin=request.sha256)


def _recorded_model(first: Resolved) -> dict[str, str | None]:
    """The `model` section of the network's meebs_recipe, as far as generate trusts it:
    a builtin name, or a path with its pin. Whatever a file says, generate never
    unpickles the base it names (a stranger's file could name any pickle on disk)."""
    try:
        recipe = json.loads(first.metadata["meebs_recipe"])
    except (ValueError, RecursionError):
        recipe = None
    model = recipe.get("model") if isinstance(recipe, dict) else None
    model = model if isinstance(model, dict) else {}
    fields = {key: model.get(key) for key in ("builtin", "path", "sha256")}
    if not model or not all(value is None or _plain(value) for value in fields.values()):
        raise MeebsError(
            f"{first.path}: its meebs_recipe records no usable base model "
            "(model.builtin, model.path, model.sha256): give --model"
        )
    if fields["path"] and Path(fields["path"]).suffix.lower() in PICKLE_SUFFIXES:
        raise MeebsError(
            f"{first.path} was trained on the pickle file {quoted(fields['path'])}; generate "
            "never unpickles a file a network names: convert it to .safetensors, give --model"
        )
    return fields


def _plain(value: object) -> bool:
    """A string that can be a model name, path or hash: printable, one line, not huge."""
    return isinstance(value, str) and 0 < len(value) <= 4096 and value.isprintable()


def load_recorded_base(model: Mapping[str, Any], pin: str | None = None) -> BaseModel:
    """The base a recipe's `model` section names (as recorded in a network or a run).

    `pin` replaces the recorded sha256, for a user who knows the base file changed.
    """
    return load_base_model(
        builtin=model.get("builtin"),
        path=model.get("path"),
        sha256=pin or model.get("sha256"),
        allow_pickle=bool(model.get("allow_pickle", False)),
    )


def _warn_other_base(item: Resolved, base: BaseModel, console: Console) -> None:
    trained_on = item.metadata.get("ss_new_sd_model_hash")
    if trained_on and trained_on != base.sha256:
        console.print(
            f"[yellow]warning:[/yellow] {escape(item.tag.name)} was trained on base sha256 "
            f"{escape(clip(trained_on[:10]))}, not on {escape(base.name)} "
            f"({base.sha256[:10]})",
            highlight=False,
        )


def _write_png(out: Path, seed: int, image: Image.Image, info: str) -> Path:
    """`NNNNN-SEED.png` with the next free number (A1111's naming), atomically."""
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _NUMBERED.match(p.name))]
    number = max(numbers, default=-1) + 1
    while (path := out / f"{number:05d}-{seed}.png").exists():
        number += 1
    pnginfo = PngInfo()
    pnginfo.add_text("parameters", info)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo, compress_level=9)
    write_atomic(path, [buffer.getbuffer()])
    return path
