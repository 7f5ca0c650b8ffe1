"""What `make pretrain-tiny` writes and how it proves a rerun matched: the diffusers
folder, its record (`pretrain.json`), its model card, and the comparison with the
committed `builtin: tiny-trained`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from meebs.files.atomic_write import make_folder, make_temp_folder, write_text_atomic
from meebs.tiny.meeb_scorer import MeebScorer

ASSET_DIR = Path(__file__).parent.parent / "assets" / "tiny-trained"
RECORD_NAME = "pretrain.json"
CARD_NAME = "MODEL_CARD.md"
GENERATOR_SOURCES = ("cartoons.py", "class_looks.py", "synthetic.py", "pretrain_data.py")
_CAUSES = ("hardware_class", "torch", "generator_version", "config")
"""What may make a rerun differ, checked in this order when one does."""
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def save_folder(
    out: Path,
    parts: dict[str, torch.nn.Module],
    configs: dict[str, dict],
    scorers: dict[str, MeebScorer],
) -> None:
    """Write the diffusers folder (fp16 weights) and the scorers into a temporary folder
    beside `out`, then rename it into place: `out` is never left half written."""
    make_folder(out.parent)
    staging = make_temp_folder(out.parent, prefix=f".{out.name}-")
    try:
        for name, module in parts.items():
            folder = staging / name
            folder.mkdir()
            config_text = json.dumps(configs[name], indent=2, sort_keys=True) + "\n"
            (folder / "config.json").write_text(config_text)
            state = {key: tensor.half().contiguous() for key, tensor in module.state_dict().items()}
            stem = _WEIGHT_STEMS.get(name, "model")
            save_file(state, folder / f"{stem}.safetensors", metadata={"format": "pt"})
        for name, scorer in scorers.items():
            scorer.save(staging / "scorer" / f"{name}.safetensors")
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(new: Path, old: Path) -> None:
    """Put the folder `new` where `old` is, moving the old one aside until it is done."""
    aside = old.with_name(f".{old.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if old.exists():
        old.replace(aside)
    new.replace(old)
    shutil.rmtree(aside, ignore_errors=True)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight and config file under `folder`, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix in (".safetensors", ".json") and path.name != RECORD_NAME
    }


def folder_sha256_of(folder: Path) -> str:
    """The sha256 a recipe pins for this folder (loading it also proves it loads)."""
    from meebs.models.loading import load_base_model

    return load_base_model(builtin=None, path=folder, sha256=None, allow_pickle=False).sha256


def generator_version() -> str:
    """sha256 (first 16 digits) of the drawing code: the data is a function of it."""
    digest = hashlib.sha256()
    for name in GENERATOR_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def write_record(out: Path, record: dict[str, Any]) -> None:
    """`pretrain.json` (every figure and hash) and the model card made from it."""
    write_text_atomic(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / CARD_NAME, model_card(record))


def model_card(record: dict[str, Any]) -> str:
    """How the weights were made and what they measure, in Markdown."""
    config, figures, seconds = record["config"], record["figures"], record["seconds"]
    total = sum(seconds.values())
    lines = [
        "# tiny-trained: the demo's base model",
        "",
        "A tiny SD 1.5-shaped model (VAE, UNet, CLIP text encoder) trained from scratch on",
        "drawings from the project's generators, so the CPU demo can show a LoHA learning",
        "meebs. Written by `make pretrain-tiny`; `builtin: tiny-trained` in a recipe.",
        "",
        "- UNet and text encoder saw people, shapes and the made-up creatures `blick`,",
        "  `zorp`, `tovi` and `glim` (`meebs/tiny/class_looks.py`), never a meeb.",
        "- The VAE (a compressor) also saw meebs, so their look survives the latents.",
        "- `scorer/` holds the meeb scorer (`meebs/tiny/meeb_scorer.py`), trained on fresh",
        "  drawings, half of them through this VAE. It measures; it never trains anything.",
        "",
        "| | |",
        "| --- | --- |",
        f"| command | `{record['command']}` |",
        f"| seed | {config['seed']} |",
        f"| generator version | `{record['generator_version']}` (sha256 of "
        + ", ".join(f"`meebs/{name}`" for name in GENERATOR_SOURCES)
        + ") |",
        f"| torch | {record['torch']} |",
        f"| hardware class | `{record['hardware_class']}` |",
        f"| VAE | {config['vae_steps']} steps x {config['vae_batch']} crops of "
        f"{config['vae_crop']} px, {seconds['vae'] / 60:.1f} min |",
        f"| scorer | 2 variants x {config['scorer_steps']} steps, "
        f"{seconds['scorer'] / 60:.1f} min |",
        f"| UNet + text encoder | {config['unet_steps']} steps x {config['unet_batch']}, "
        f"{seconds['unet'] / 60:.1f} min |",
        f"| total | {total / 60:.1f} min |",
        f"| folder sha256 (the pin) | `{record['folder_sha256']}` |",
        "",
        "## Figures",
        "",
        "| figure | value |",
        "| --- | ---: |",
        *(f"| {name} | {value:.4f} |" for name, value in figures.items()),
        "",
        "VAE PSNR: dB of the round trip (latent mean) on 64 held-out drawings per kind.",
        "Scorer accuracy: share right on 100 held-out drawings per kind, clean and through",
        "the VAE.",
        "",
        "## Files",
        "",
        *(f"- `{name}`: sha256 `{digest}`" for name, digest in record["files"].items()),
        "",
    ]
    return "\n".join(lines)


def compare_with(out: Path, reference: Path) -> bool:
    """Print whether `out` holds the same bytes as `reference`; True when it does."""
    recorded = reference / RECORD_NAME
    if not recorded.is_file():
        print(f"no {recorded} to compare with (nothing committed yet)")
        return False
    old = json.loads(recorded.read_text())
    new = json.loads((out / RECORD_NAME).read_text())
    differing = sorted(
        name
        for name in set(old["files"]) | set(new["files"])
        if old["files"].get(name) != new["files"].get(name)
    )
    if not differing:
        print(f"same bytes as {reference}: {len(new['files'])} files")
        return True
    print(f"differs from {reference} in: {', '.join(differing)}")
    for key in ("hardware_class", "torch", "generator_version", "config"):
        if old.get(key) != new.get(key):
            print(f"  {key}: committed {old.get(key)}, this run {new.get(key)}")
    if all(
        old.get(key) == new.get(key)
        for key in ("hardware_class", "torch", "generator_version", "config")
    ):
        print("  same hardware class, torch, generators and settings: this is a bug, report it")
    return False


def install(out: Path, target: Path) -> None:
    """Copy the run's folder over the committed one (the maintainer's step)."""
    staging = make_temp_folder(target.parent, prefix=f".{target.name}-")
    try:
        shutil.copytree(out, staging, dirs_exist_ok=True)
        _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
