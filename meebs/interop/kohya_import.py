"""A kohya_ss GUI LoRA config (the JSON its "Save config" writes) as a recipe.

Users arrive with a kohya_ss config; the original project's runs were made that way.
`import-kohya` turns one into a recipe, applying the GUI's own reading of its values
(REFERENCE section 8):

* older GUIs wrote numbers and booleans as strings ("2", "1e-4", "True"): accepted;
* `seed` 0 or "" means a random seed in kohya; a recipe always has a fixed one;
* `lr_warmup` is a percentage of all steps, unless `lr_warmup_steps` is set;
* `lr_scheduler_num_cycles` "" means one cycle per epoch;
* a zero text-encoder LR trains the UNet only (and the reverse); both zero means both
  use `learning_rate`;
* `clip_skip` 0 means none; `noise_offset` counts only with `noise_offset_type` Original;
* `LoRA_type` Standard trains no k x k convs, whatever `conv_dim` says.

Nothing is dropped silently: every key of the config that has no equivalent is listed in
the `notes` returned with the result (the CLI prints them on stderr), and a value that
cannot be converted stops with one line naming the key and the fix.
"""

from __future__ import annotations

import functools
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from meebs.errors import MeebsError, RecipeError
from meebs.files.text_files import JsonLimitError, load_json, read_text, shown
from meebs.interop.kohya_export import EXPORTS
from meebs.interop.kohya_keys import (
    LORA_TYPES,
    SAVE_PRECISIONS,
    SIMPLE,
    STANDARD,
    Converted,
    parse_optimizer_args,
    to_bool,
    to_float,
    to_int,
    to_str,
    value_error,
    value_text,
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

_OFF = (None, "", 0, 0.0, False, "none", "None", [], {})

CONV_KEYS = {
    "conv_dim": ("network.conv_dim", to_int),
    "conv_alpha": ("network.conv_alpha", to_float),
}


@functools.cache  # typing.get_type_hints is slow: half of an import's time, uncached
def _choices(recipe_key: str) -> tuple[Any, ...]:
    """The values a recipe key allows when it is a fixed list (Literal), else ()."""
    section, name = recipe_key.split(".")
    section_type = typing.get_type_hints(Recipe)[section]
    hint = typing.get_type_hints(section_type)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


class _Importer:
    """Reads one kohya config; `take` marks a key as converted, the rest are reported."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.used: set[str] = set()
        self.raw: dict[str, Any] = {}
        self.notes: list[str] = []

    def take(self, key: str) -> Any:
        """The value of `key`, or None when absent or empty (the GUI's "not set")."""
        self.used.add(key)
        value = self.config.get(key)
        return None if value is None or value == "" else value

    def put(self, recipe_key: str, value: Any) -> None:
        section, name = recipe_key.split(".")
        self.raw.setdefault(section, {})[name] = value

    def simple(self, table: dict[str, tuple[str, Callable[[str, Any], Any]]]) -> None:
        for key, (recipe_key, convert) in table.items():
            value = self.take(key)
            if value is None:
                continue
            value = convert(key, value)
            allowed = _choices(recipe_key)
            if allowed and value not in allowed:
                choices = ", ".join(map(str, allowed))
                raise MeebsError(
                    f"kohya_ss key {key}: {value_text(value)} is not supported; "
                    f"use one of {choices}"
                )
            self.put(recipe_key, value)

    def unconverted(self) -> list[str]:
        """One line each for the keys set to something and for those left empty or off."""
        rest = {key: self.config[key] for key in sorted(self.config) if key not in self.used}
        active = [
            f"{shown(key)}={value_text(value)}" for key, value in rest.items() if value not in _OFF
        ]
        off = [shown(key) for key, value in rest.items() if value in _OFF]
        lines = []
        if active:
            lines.append("not converted (no meebs equivalent): " + ", ".join(active))
        if off:
            lines.append("not converted, empty or off in the config: " + ", ".join(off))
        return lines


def import_kohya(path: Path) -> Converted:
    """A kohya_ss GUI LoRA config as recipe YAML that `load_recipe` accepts."""
    path = Path(path)
    config = _read_config(path)
    importer = _Importer(config)
    importer.simple(SIMPLE)
    _import_network(importer)
    _import_model(importer)
    _import_schedule(importer)
    _import_precision_and_speed(importer)
    _import_outputs(importer)
    _import_samples(importer)
    try:
        recipe = recipe_from_dict(importer.raw, where=f"{path} (converted to a recipe)")
    except RecipeError as error:
        raise RecipeError(f"{error}{_kohya_key_hint(str(error))}") from None
    try:  # the prompt lines fail now, not at `plan`
        recipe_prompts(recipe)
    except RecipeError as error:
        raise MeebsError(f"kohya_ss key sample_prompts: {error}") from None
    header = (
        f"# converted by `import-kohya {shown(path.name)}`; every key: python entrypoint.py keys\n"
    )
    body = yaml.safe_dump(_in_recipe_order(importer.raw), sort_keys=False, allow_unicode=True)
    return Converted(header + body, (*importer.notes, *importer.unconverted()))


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
    for flag in ("v2", "v_parameterization", "sdxl"):
        if config.get(flag) not in _OFF and to_bool(flag, config[flag]):
            raise MeebsError(f"{path}: {flag} is true, but meebs trains SD 1.x only; set it false")
    return config


def _import_network(importer: _Importer) -> None:
    lora_type = importer.take("LoRA_type")
    if lora_type is None:
        lora_type = STANDARD
    if lora_type == STANDARD:
        importer.put("network.algo", "lora")
        importer.put("network.conv_dim", 0)
        ignored = [
            f"{key}={value_text(importer.take(key))}" for key in CONV_KEYS if key in importer.config
        ]
        if ignored:
            importer.notes.append(
                f"LoRA_type Standard trains no k x k convs: ignored {', '.join(ignored)}"
            )
        return
    if not isinstance(lora_type, str) or lora_type not in LORA_TYPES:
        allowed = ", ".join([*LORA_TYPES, STANDARD])
        raise MeebsError(
            f"kohya_ss key LoRA_type: {value_text(lora_type)} is not supported; "
            f"use one of {allowed}"
        )
    importer.put("network.algo", LORA_TYPES[lora_type])
    importer.simple(CONV_KEYS)
    for key in ("use_tucker", "use_cp"):  # newer and older GUIs; LyCORIS ORs them
        value = importer.take(key)
        if value is not None and to_bool(key, value):
            importer.put("network.use_tucker", True)


def _import_model(importer: _Importer) -> None:
    """The base model path; SD 1.5 hub ids and the pinned file name get the sha256 pin."""
    model = importer.take("pretrained_model_name_or_path")
    if model is None:
        raise MeebsError(
            "kohya_ss key pretrained_model_name_or_path is empty; set it to an SD 1.5 checkpoint"
        )
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


def _import_schedule(importer: _Importer) -> None:
    epochs = None
    for key in ("epoch", "max_train_epochs"):  # max_train_epochs wins when set
        value = importer.take(key)
        if value is not None and to_int(key, value) > 0:
            epochs = to_int(key, value)
    if epochs is not None:
        importer.put("train.epochs", epochs)
    steps = importer.take("max_train_steps")
    seed = importer.take("seed")
    if seed is None or to_int("seed", seed) == 0:
        importer.notes.append(
            f"seed: kohya_ss draws a random one; the recipe keeps train.seed {Recipe().train.seed}"
        )
    else:
        importer.put("train.seed", to_int("seed", seed))
    _import_learning_rates(importer)
    percent = importer.take("lr_warmup")
    warmup_steps = importer.take("lr_warmup_steps")
    if warmup_steps is not None and to_int("lr_warmup_steps", warmup_steps) > 0:
        if steps is None or to_int("max_train_steps", steps) <= 0:
            raise MeebsError(
                "kohya_ss key lr_warmup_steps: meebs needs warmup as a fraction of all steps; "
                "set lr_warmup (percent) instead, or max_train_steps"
            )
        fraction = to_int("lr_warmup_steps", warmup_steps) / to_int("max_train_steps", steps)
        importer.put("train.lr_warmup", round(fraction, 12))
    elif percent is not None:
        importer.put("train.lr_warmup", round(to_float("lr_warmup", percent) / 100, 12))
    warmup = importer.raw.get("train", {}).get("lr_warmup", 0)
    if importer.raw.get("train", {}).get("lr_scheduler") == "constant" and warmup > 0:
        raise MeebsError(
            "kohya_ss keys lr_scheduler constant and lr_warmup: sd-scripts refuses a warmup with "
            "the constant scheduler; set lr_warmup to 0 or lr_scheduler to constant_with_warmup"
        )
    if steps is not None and to_int("max_train_steps", steps) > 0:
        importer.notes.append(
            f"max_train_steps {shown(steps)}: meebs trains whole epochs; "
            "set train.epochs so that `plan` shows about that many steps"
        )
    cycles = importer.take("lr_scheduler_num_cycles")
    if cycles is None:
        cycles = epochs  # the GUI's "" means one cycle per epoch
    if cycles is not None:
        importer.put("train.lr_scheduler_num_cycles", to_int("lr_scheduler_num_cycles", cycles))
    args = importer.take("optimizer_args")
    if args is not None:
        importer.put("train.optimizer_args", parse_optimizer_args(to_str("optimizer_args", args)))
    gamma = importer.take("min_snr_gamma")
    if gamma is not None and to_float("min_snr_gamma", gamma) > 0:
        importer.put("train.min_snr_gamma", to_float("min_snr_gamma", gamma))


def _import_learning_rates(importer: _Importer) -> None:
    """Both zero: both use learning_rate (recipe default); one zero: train the other only."""
    te, unet = (importer.take(key) for key in ("text_encoder_lr", "unet_lr"))
    te_lr = 0.0 if te is None else to_float("text_encoder_lr", te)
    unet_lr = 0.0 if unet is None else to_float("unet_lr", unet)
    if te_lr or unet_lr:
        importer.put("train.text_encoder_lr", te_lr)
        importer.put("train.unet_lr", unet_lr)


def _import_precision_and_speed(importer: _Importer) -> None:
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
        importer.put("data.resolution", _resolution(resolution))
    clip_skip = importer.take("clip_skip")
    if clip_skip is not None:
        importer.put("train.clip_skip", max(1, to_int("clip_skip", clip_skip)))
    offset_type = importer.take("noise_offset_type") or "Original"
    offset = importer.take("noise_offset")
    if offset_type == "Original" and offset is not None:
        importer.put("train.noise_offset", to_float("noise_offset", offset))
    elif offset_type != "Original":
        importer.notes.append(
            f"noise_offset_type {shown(offset_type)}: meebs has the Original noise "
            "offset only; the recipe trains without one"
        )


def _resolution(value: Any) -> list[int]:
    parts = str(value).replace(" ", "").split(",")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise value_error("max_resolution", value, 'width,height such as "512,512"')
    return [to_int("max_resolution", part) for part in parts]


def _import_outputs(importer: _Importer) -> None:
    every = importer.take("save_every_n_epochs")
    if every is not None and to_int("save_every_n_epochs", every) > 0:
        importer.put("output.save_every_n_epochs", to_int("save_every_n_epochs", every))
    keep = importer.take("save_last_n_epochs")
    if keep is not None and to_int("save_last_n_epochs", keep) > 0:
        importer.put("output.keep_last_n_epochs", to_int("save_last_n_epochs", keep))
    extension = importer.take("caption_extension")
    importer.put("data.caption_extension", ".caption" if extension is None else extension)
    file_format = importer.take("save_model_as")
    if file_format not in (None, "safetensors"):
        importer.notes.append(f"save_model_as {shown(file_format)}: meebs writes .safetensors only")


def _import_samples(importer: _Importer) -> None:
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
