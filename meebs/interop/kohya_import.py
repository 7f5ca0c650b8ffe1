"""A kohya_ss GUI LoRA config (the JSON its "Save config" writes) as a recipe.

Users arrive with a kohya_ss config; the original project's runs were made that way.
`import-kohya` turns one into a recipe, applying the GUI's own reading of its values
(REFERENCE section 8). `import_kohya` reads the config part by part, each in its module:

* kohya_refusals: what cannot mean the same training (another model family or kind of
  training, another loss, inputs or LR schedule) stops in one line saying why;
* kohya_network: LoRA_type as network.algo, its ranks and network args, and the
  regularisers meebs has no key for;
* kohya_optim: epochs, seed, learning rates, scheduler, warmup and the optimizer;
* here: the base model, the images and buckets, precision and speed, outputs and
  samples, and the recipe's text;
* kohya_reader: what they share, the config read key by key (kohya_keys: the keys and
  values export shares).

Older GUIs wrote numbers and booleans as strings ("2", "1e-4", "True"): accepted.
`clip_skip` 0 means none; `noise_offset` counts only with `noise_offset_type` Original.

Presets (the GUI's presets/lora/*.json) leave the base model and the image folder empty:
they convert, the recipe holds `model.path` and `data.train_dir` blank with a comment to
fill them in (`Converted.fill_in`), and `plan`/`train` stop in one line until they are set.
A value kohya accepts but meebs does not (bucket_reso_steps 1, a side of 650) becomes the
nearest one meebs allows, with a note saying why.

Nothing is dropped silently: every key of the config that has no equivalent is listed in
the `notes` returned with the result (the CLI prints them on stderr), and a value that
cannot be converted stops with one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from meebs.errors import MeebsError, RecipeError
from meebs.files.text_files import JsonLimitError, load_json, read_text, shown
from meebs.interop.kohya_export import EXPORTS
from meebs.interop.kohya_keys import (
    SAVE_PRECISIONS,
    SIMPLE,
    Converted,
    to_bool,
    to_float,
    to_int,
    to_str,
    value_error,
    value_text,
)
from meebs.interop.kohya_network import CONV_KEYS, import_network, note_regularisers
from meebs.interop.kohya_optim import import_optimizer, import_schedule
from meebs.interop.kohya_reader import OFF, KohyaReader
from meebs.interop.kohya_refusals import (
    KIND_KEYS,
    KIND_TRAINS,
    OTHER_MODELS,
    other_kind,
    refuse_other_trainings,
)
from meebs.models.fetch import read_pins
from meebs.models.sampling import normalize_sampler, recipe_prompts
from meebs.recipe.keys import documented_keys
from meebs.recipe.loading import recipe_from_dict
from meebs.recipe.schema import Recipe

# kohya's sample defaults (sd-scripts' sample_image_inference), used for prompts without
# --s / --l: imported so the samples look like the GUI's.
KOHYA_SAMPLE_STEPS = 30
KOHYA_SAMPLE_CFG = 7.5
# Hub ids kohya_ss users give for SD 1.5; the appliance is offline and trains the pinned file.
SD15_HUB_IDS = ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")
SD15_PIN = "sd15"
# sd-scripts' DEFAULT_LAST_OUTPUT_NAME: the file name when output_name is empty.
KOHYA_OUTPUT_NAME = "last"
# The VAE works in 8-pixel units (a latent pixel is 8 x 8 image pixels): resolutions and
# bucket steps are multiples of it (sd-scripts warns that other steps "may not work").
LATENT_FACTOR = 8
MIN_SIDE = 64  # data.resolution's smallest side

# What a preset leaves empty and the user fills in: recipe key -> (kohya key, what it is).
FILL_IN = {
    "model.path": ("pretrained_model_name_or_path", "an SD 1.5 checkpoint or diffusers folder"),
    "data.train_dir": ("train_data_dir", "the folder that holds the `{repeats}_{tokens}` folders"),
}
# Stand-ins for FILL_IN while the converted recipe is checked; never written.
_CHECK_FILLERS = {"model.path": "model.safetensors", "data.train_dir": "images"}

# Handled by their own functions rather than one to one (SIMPLE is shared with export).
_SPECIAL = {
    "train_data_dir",
    "bucket_reso_steps",
    "min_bucket_reso",
    "max_bucket_reso",
    "output_name",
    "network_dim",
    "network_alpha",
    "lr_scheduler",
    "optimizer",
}
IMPORT_SIMPLE = {key: entry for key, entry in SIMPLE.items() if key not in _SPECIAL}


def import_kohya(path: Path) -> Converted:
    """A kohya_ss GUI LoRA config as recipe YAML that `load_recipe` accepts once the
    `fill_in` keys (empty in a preset) are set."""
    path = Path(path)
    config = _read_config(path)
    importer = KohyaReader(config)
    refuse_other_trainings(importer)
    importer.simple(IMPORT_SIMPLE)
    import_network(importer)
    _import_model(importer)
    _import_data(importer)
    import_schedule(importer)
    import_optimizer(importer)
    _import_precision_and_speed(importer)
    _import_outputs(importer)
    _import_samples(importer)
    note_regularisers(importer)
    check = copy.deepcopy(importer.raw)
    for key in importer.fill_in:
        section, name = key.split(".")
        check.setdefault(section, {})[name] = _CHECK_FILLERS[key]
    try:
        recipe = recipe_from_dict(check, where=f"{path} (converted to a recipe)")
    except RecipeError as error:
        raise RecipeError(f"{error}{_kohya_key_hint(str(error))}") from None
    try:  # the prompt lines fail now, not at `plan`
        recipe_prompts(recipe)
    except RecipeError as error:
        raise MeebsError(f"kohya_ss key sample_prompts: {error}") from None
    header = (
        f"# converted by `import-kohya {shown(path.name)}`; every key: python entrypoint.py keys\n"
    )
    if importer.fill_in:
        header += f"# fill in before plan/train: {', '.join(importer.fill_in)}\n"
    body = _recipe_text(_in_recipe_order(importer.raw), importer.fill_in)
    notes = (*importer.notes, *importer.unconverted())
    return Converted(header + body, notes, tuple(importer.fill_in))


def _recipe_text(raw: dict[str, Any], fill_in: list[str]) -> str:
    """The recipe as YAML; each fill-in key's line ends in a comment saying what goes there."""
    text = ""
    for section, keys in raw.items():
        part = yaml.safe_dump({section: keys}, sort_keys=False, allow_unicode=True)
        for key in fill_in:
            where, name = key.split(".")
            if where == section:
                kohya_key, what = FILL_IN[key]
                part = re.sub(
                    rf"^(  {name}: .*)$",
                    lambda match, kohya_key=kohya_key, what=what: (
                        f"{match.group(1)}  # fill in: {what} (the config's {kohya_key} is empty)"
                    ),
                    part,
                    count=1,
                    flags=re.MULTILINE,
                )
        text += part
    return text


def _kohya_key_hint(message: str) -> str:
    """Names the kohya_ss key behind the recipe key that a validation message names."""
    tables = (SIMPLE, CONV_KEYS, EXPORTS)
    keys = [
        key
        for table in tables
        for key, (recipe_key, _) in table.items()
        if f": {recipe_key}:" in message
    ]
    return f" (kohya_ss key {keys[0]})" if keys else ""


def _in_recipe_order(raw: dict[str, Any]) -> dict[str, Any]:
    """Sections and keys in the order `python entrypoint.py keys` lists them."""
    order = [key for key, *_ in documented_keys()]
    ordered: dict[str, Any] = {}
    for key in order:
        section, name = key.split(".")
        if name in raw.get(section, {}):
            ordered.setdefault(section, {})[name] = raw[section][name]
    return ordered


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MeebsError(f"{path}: kohya_ss config not found")
    try:
        config = load_json(read_text(path, "kohya_ss config"))
    except json.JSONDecodeError as error:
        raise MeebsError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno} ({error.msg}); "
            "give the file the GUI's 'Save config' wrote"
        ) from None
    except JsonLimitError as error:
        raise MeebsError(f"{path}: {error}; give the file the GUI's 'Save config' wrote") from None
    if not isinstance(config, dict):
        raise MeebsError(f"{path}: a kohya_ss config is a JSON object of settings")
    for flag, family in OTHER_MODELS.items():
        if config.get(flag) not in OFF and to_bool(flag, config[flag]):
            raise MeebsError(
                f"{path}: {flag} is true ({family}), but meebs trains SD 1.x only; set it false"
            )
    kind = other_kind(config)
    if kind is not None:
        raise MeebsError(
            f"{path}: a kohya_ss {kind} config ({KIND_KEYS[kind]}), not a LoRA one: it trains "
            f"{KIND_TRAINS[kind]}, meebs trains LyCORIS networks; save one from the GUI's LoRA tab"
        )
    return config


def _import_model(importer: KohyaReader) -> None:
    """The base model path; SD 1.5 hub ids and the pinned file name get the sha256 pin."""
    old_weights = importer.take("lora_network_weights")  # the GUI's old name
    if old_weights is not None and importer.get("network.weights") is None:
        importer.put("network.weights", to_str("lora_network_weights", old_weights))
    model = importer.take("pretrained_model_name_or_path")
    if model is None:
        _leave_for_user(importer, "model.path", None)
        return
    model = to_str("pretrained_model_name_or_path", model)
    pin = read_pins()[SD15_PIN]
    if model in SD15_HUB_IDS:
        importer.notes.append(
            f"pretrained_model_name_or_path {model}: the hub id became models/{pin.file} "
            "(download it with `make fetch-model`)"
        )
        model = f"models/{pin.file}"
    importer.put("model.path", model)
    if Path(model).name == pin.file:
        importer.put("model.sha256", pin.sha256)
        importer.notes.append(
            f"model.sha256: pinned to models.lock.yaml's {SD15_PIN}; a different file stops the run"
        )


def _leave_for_user(importer: KohyaReader, recipe_key: str, blank: Any) -> None:
    kohya_key, what = FILL_IN[recipe_key]
    importer.put(recipe_key, blank)
    importer.fill_in.append(recipe_key)
    importer.notes.append(
        f"fill in {recipe_key}: {kohya_key} is empty (a preset); set it to {what} in the "
        "recipe, plan and train stop until it is set"
    )


def _import_data(importer: KohyaReader) -> None:
    """The image folder, and the bucket sizes as multiples of 8 (LATENT_FACTOR)."""
    folder = importer.take("train_data_dir")
    dataset = importer.take("dataset_config")
    if dataset is not None:
        importer.notes.append(
            f"dataset_config {value_text(dataset)}: meebs reads the kohya folder layout only; "
            "lay its subsets out as `{repeats}_{tokens}` folders for data.train_dir"
        )
    if folder is None:
        _leave_for_user(importer, "data.train_dir", "")
    else:
        importer.put("data.train_dir", to_str("train_data_dir", folder))
    step = importer.take("bucket_reso_steps")
    step = None if step is None else to_int("bucket_reso_steps", step)
    if step is not None and (step < LATENT_FACTOR or step % LATENT_FACTOR):
        adjusted = max(LATENT_FACTOR, _nearest_multiple(step))
        importer.notes.append(
            f"bucket_reso_steps {value_text(step)} became {adjusted}: bucket sides are "
            "multiples of 8 in meebs, the VAE's unit (a latent pixel is 8 x 8 pixels; "
            "sd-scripts warns that other steps may not work)"
        )
        step = adjusted
    if step is not None:
        importer.put("data.bucket_reso_steps", step)
    step = step or Recipe().data.bucket_reso_steps
    for key, up in (("min_bucket_reso", False), ("max_bucket_reso", True)):
        value = importer.take(key)
        if value is None:
            continue
        value = to_int(key, value)
        if value % step:  # sd-scripts' adjust_min_max_bucket_reso_by_steps: min down, max up
            adjusted = value - value % step + (step if up else 0)
            importer.notes.append(
                f"{key} {value_text(value)} became {value_text(adjusted)}, a multiple of "
                f"bucket_reso_steps {value_text(step)}, as sd-scripts rounds it"
            )
            value = adjusted
        importer.put(f"data.{key}", value)
    extension = importer.take("caption_extension")
    importer.put("data.caption_extension", ".caption" if extension is None else extension)
    if extension is not None and "foldername" in str(extension):
        importer.notes.append(
            f"caption_extension {value_text(extension)}: no such caption files, so each image "
            "is captioned with its folder's tokens, in meebs as in kohya"
        )


def _import_precision_and_speed(importer: KohyaReader) -> None:
    precision = importer.take("save_precision")
    if precision is not None:
        if not isinstance(precision, str) or precision not in SAVE_PRECISIONS:
            raise MeebsError(
                f"kohya_ss key save_precision: {value_text(precision)} is not one of "
                f"{', '.join(SAVE_PRECISIONS)}"
            )
        importer.put("output.save_precision", SAVE_PRECISIONS[precision])
    attention = importer.take("xformers")
    if attention is not None and attention not in ("none", "sdpa", "xformers"):
        attention = "xformers" if to_bool("xformers", attention) else "sdpa"
    if attention is not None:
        importer.put("train.attention", "xformers" if attention == "xformers" else "sdpa")
    resolution = importer.take("max_resolution")
    if resolution is not None:
        importer.put("data.resolution", _resolution(importer, resolution))
    clip_skip = importer.take("clip_skip")
    if clip_skip is not None:
        importer.put("train.clip_skip", max(1, to_int("clip_skip", clip_skip)))
    offset_type = importer.take("noise_offset_type") or "Original"
    offset = importer.take("noise_offset")
    if offset_type == "Original" and offset is not None:
        importer.put("train.noise_offset", to_float("noise_offset", offset))
    elif offset_type != "Original":
        multires = importer.set_values(("multires_noise_iterations", "multires_noise_discount"))
        importer.notes.append(
            f"noise_offset_type {shown(offset_type)}: meebs has the Original noise "
            "offset only; the recipe trains without one"
            + (f" (ignored {', '.join(multires)})" if multires else "")
        )


def _resolution(importer: KohyaReader, value: Any) -> list[int]:
    parts = str(value).replace(" ", "").split(",")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise value_error("max_resolution", value, 'width,height such as "512,512"')
    sides = [to_int("max_resolution", part) for part in parts]
    adjusted = [max(MIN_SIDE, _nearest_multiple(side)) for side in sides]
    if adjusted != sides and all(side > 0 for side in sides):
        importer.notes.append(
            f"max_resolution {value_text(value)} became {adjusted[0]},{adjusted[1]}: sides are "
            f"multiples of 8 (the VAE's unit), at least {MIN_SIDE}, in meebs"
        )
        return adjusted
    return sides


def _nearest_multiple(value: int) -> int:
    """The multiple of LATENT_FACTOR nearest `value` (halves up; integers, as a config's
    number may be too large for a float)."""
    return (value + LATENT_FACTOR // 2) // LATENT_FACTOR * LATENT_FACTOR


def _import_outputs(importer: KohyaReader) -> None:
    every = importer.take("save_every_n_epochs")
    if every is not None and to_int("save_every_n_epochs", every) > 0:
        importer.put("output.save_every_n_epochs", to_int("save_every_n_epochs", every))
    keep = importer.take("save_last_n_epochs")
    if keep is not None and to_int("save_last_n_epochs", keep) > 0:
        importer.put("output.keep_last_n_epochs", to_int("save_last_n_epochs", keep))
    name = importer.take("output_name")
    if name is None:
        importer.notes.append(
            f"output_name is empty: sd-scripts names the files {KOHYA_OUTPUT_NAME!r}, and so "
            "does the recipe"
        )
        name = KOHYA_OUTPUT_NAME
    importer.put("output.name", to_str("output_name", name))
    file_format = importer.take("save_model_as")
    if file_format not in (None, "safetensors"):
        importer.notes.append(f"save_model_as {shown(file_format)}: meebs writes .safetensors only")


def _import_samples(importer: KohyaReader) -> None:
    """Prompt lines keep kohya's --n --w --h --d --s --l syntax (checked with the recipe)."""
    text = importer.take("sample_prompts")
    prompts = [line.strip() for line in to_str("sample_prompts", text or "").splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    sampler = importer.take("sample_sampler")
    if sampler is not None:
        try:
            importer.put("sample.sampler", normalize_sampler(to_str("sample_sampler", sampler)))
        except MeebsError as error:
            raise MeebsError(f"kohya_ss key sample_sampler: {error}") from None
    if prompts:
        importer.put("sample.prompts", prompts)
        importer.put("sample.steps", KOHYA_SAMPLE_STEPS)
        importer.put("sample.cfg", KOHYA_SAMPLE_CFG)
