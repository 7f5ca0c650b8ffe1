"""A recipe as a kohya_ss GUI LoRA config (the JSON its "Save config" writes).

`export-kohya` writes the config the GUI loads, in the GUI's own reading of its values
(REFERENCE section 8): `lr_warmup` as a percentage, both text-encoder and UNet LR 0 when
the recipe leaves them to `learning_rate`, `LoRA_type` Standard for a LoRA without k x k
convs. Nothing is dropped silently: every recipe key with no kohya_ss equivalent is listed
in the `notes` returned with the result (the CLI prints them on stderr).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meebs.interop.kohya_keys import (
    LORA_TYPES,
    SAVE_PRECISIONS,
    SIMPLE,
    STANDARD,
    Converted,
    format_optimizer_args,
)
from meebs.models.sampling import SAMPLER_ALIASES
from meebs.recipe.keys import documented_keys
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe


def export_kohya(path: Path) -> Converted:
    """A recipe as a kohya_ss GUI LoRA config (JSON text)."""
    recipe = load_recipe(path)
    config, used = _export(recipe)
    notes = []
    if recipe.model.builtin is not None:
        notes.append(
            f"model.builtin {recipe.model.builtin}: kohya_ss has no built-in models; "
            "set pretrained_model_name_or_path in the GUI"
        )
    if recipe.sample.sampler not in _KOHYA_SAMPLERS:
        notes.append(f"sample.sampler {recipe.sample.sampler}: kohya_ss has no such sampler")
    if recipe.network.dora_wd:
        notes.append(
            "network.dora_wd: kohya_ss trains DoRA with lycoris' default magnitude per output "
            "row, meebs per input column (the axis AUTOMATIC1111 applies): the same "
            "training needs wd_on_output=False among sd-scripts' --network_args"
        )
    if recipe.train.seed == 0:
        notes.append("train.seed 0: kohya_ss reads seed 0 as 'random'; pick another seed")
    flat = {key: json.dumps(recipe_value(recipe, key)) for key, *_ in documented_keys()}
    rest = [f"{key}={value}" for key, value in flat.items() if key not in used]
    notes.append("recipe keys with no kohya_ss equivalent (not exported): " + ", ".join(rest))
    return Converted(json.dumps(config, indent=2) + "\n", tuple(notes))


def recipe_value(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


# kohya key -> (the recipe key it expresses, its value for a recipe); beside SIMPLE.
EXPORTS: dict[str, tuple[str, Callable[[Recipe], Any]]] = {
    "pretrained_model_name_or_path": ("model.path", lambda r: r.model.path or ""),
    "use_tucker": ("network.use_tucker", lambda r: r.network.use_tucker),
    "dora_wd": ("network.dora_wd", lambda r: r.network.dora_wd),
    "use_scalar": ("network.use_scalar", lambda r: r.network.use_scalar),
    "factor": ("network.factor", lambda r: r.network.factor),
    "decompose_both": ("network.decompose_both", lambda r: r.network.decompose_both),
    "constrain": ("network.constraint", lambda r: r.network.constraint),
    "rescaled": ("network.rescaled", lambda r: r.network.rescaled),
    "epoch": ("train.epochs", lambda r: r.train.epochs),
    "seed": ("train.seed", lambda r: r.train.seed),
    "unet_lr": ("train.unet_lr", lambda r: _explicit_lr(r, r.unet_lr)),
    "text_encoder_lr": ("train.text_encoder_lr", lambda r: _explicit_lr(r, r.text_encoder_lr)),
    "lr_warmup": ("train.lr_warmup", lambda r: round(r.train.lr_warmup * 100, 10)),
    "lr_scheduler_num_cycles": (
        "train.lr_scheduler_num_cycles",
        lambda r: r.train.lr_scheduler_num_cycles,
    ),
    "optimizer_args": (
        "train.optimizer_args",
        lambda r: format_optimizer_args(r.train.optimizer_args),
    ),
    "min_snr_gamma": ("train.min_snr_gamma", lambda r: r.train.min_snr_gamma or 0),
    "xformers": ("train.attention", lambda r: r.train.attention),
    "clip_skip": ("train.clip_skip", lambda r: r.train.clip_skip),
    "noise_offset": ("train.noise_offset", lambda r: r.train.noise_offset),
    "save_precision": (
        "output.save_precision",
        lambda r: _KOHYA_PRECISION[r.output.save_precision],
    ),
    "save_every_n_epochs": ("output.save_every_n_epochs", lambda r: r.output.save_every_n_epochs),
    "save_last_n_epochs": ("output.keep_last_n_epochs", lambda r: r.output.keep_last_n_epochs or 0),
    "max_resolution": ("data.resolution", lambda r: ",".join(map(str, r.data.resolution))),
    "caption_extension": ("data.caption_extension", lambda r: r.data.caption_extension),
    "sample_prompts": ("sample.prompts", lambda r: "\n".join(r.sample.prompts)),
    "sample_sampler": ("sample.sampler", lambda r: _KOHYA_SAMPLERS.get(r.sample.sampler, "")),
}
# Fixed values: the GUI's reading of them matches what meebs does.
_EXPORT_FIXED = {
    "max_train_epochs": "",
    "max_train_steps": 0,  # the GUI computes it from the folders, as `plan` does
    "lr_warmup_steps": 0,
    "noise_offset_type": "Original",
    "save_model_as": "safetensors",
}
# The LoKr dim kohya_ss presets give for whole Kronecker factors (lycoris trains a factor
# as a full matrix where the dim is at least half its larger side).
LOKR_FULL_MATRIX_DIM = 100000
_KOHYA_PRECISION = {ours: theirs for theirs, ours in SAVE_PRECISIONS.items()}
# A1111 name -> kohya's first alias for it (euler_a, not k_euler_a).
_KOHYA_SAMPLERS = {canonical: alias for alias, canonical in reversed(SAMPLER_ALIASES.items())}


def _explicit_lr(recipe: Recipe, lr: float) -> float:
    """0 for both when the recipe leaves both to learning_rate: the GUI's "not set"."""
    both_default = recipe.train.unet_lr is None and recipe.train.text_encoder_lr is None
    return 0 if both_default else lr


def _export(recipe: Recipe) -> tuple[dict[str, Any], set[str]]:
    """The config and the recipe keys it expresses."""
    net = recipe.network
    config: dict[str, Any] = dict(_EXPORT_FIXED)
    used = {"network.algo", "network.conv_dim", "network.conv_alpha"}
    for key, (recipe_key, _) in SIMPLE.items():
        value = recipe_value(recipe, recipe_key)
        config[key] = "" if value is None else value
        used.add(recipe_key)
    for key, (recipe_key, value_of) in EXPORTS.items():
        config[key] = value_of(recipe)
        used.add(recipe_key)
    if net.algo == "lora" and net.conv_dim == 0:
        config["LoRA_type"] = STANDARD
    else:
        config["LoRA_type"] = {algo: name for name, algo in LORA_TYPES.items()}[net.algo]
        config["conv_dim"], config["conv_alpha"] = net.conv_dim, net.conv_alpha
    if net.full_matrix:  # the GUI has no such key: a dim this large is lycoris' full matrix
        config["network_dim"] = config["conv_dim"] = LOKR_FULL_MATRIX_DIM
        used.add("network.full_matrix")
    return dict(sorted(config.items())), used
