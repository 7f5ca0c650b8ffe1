"""kohya_ss GUI LoRA configs (the JSON its "Save config" writes) to recipes and back.

Users arrive with a kohya_ss config; the original project's runs were made that way.
`import-kohya` turns one into a recipe, `export-kohya` writes a recipe as a config the GUI
loads. Both apply the GUI's own reading of its values (REFERENCE section 8):

* older GUIs wrote numbers and booleans as strings ("2", "1e-4", "True"): accepted;
* `seed` 0 or "" means a random seed in kohya; a recipe always has a fixed one;
* `lr_warmup` is a percentage of all steps, unless `lr_warmup_steps` is set;
* `lr_scheduler_num_cycles` "" means one cycle per epoch;
* a zero text-encoder LR trains the UNet only (and the reverse); both zero means both
  use `learning_rate`;
* `clip_skip` 0 means none; `noise_offset` counts only with `noise_offset_type` Original;
* `LoRA_type` Standard trains no k x k convs, whatever `conv_dim` says.

Nothing is dropped silently: every key of the other side that has no equivalent is
listed in the `notes` returned with the result (the CLI prints them on stderr), and a
value that cannot be converted stops with one line naming the key and the fix.
"""

from __future__ import annotations

import ast
import contextlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meebs.errors import MeebsError, RecipeError
from meebs.files.text_files import read_text
from meebs.models.fetch import read_pins
from meebs.models.sampling import SAMPLER_ALIASES, normalize_sampler, recipe_prompts
from meebs.recipe.schema import Recipe, documented_keys, load_recipe, recipe_from_dict

# LoRA_type <-> network.algo. "lora" with k x k convs is kohya's own LoCon (networks.lora
# with conv_dim); "Standard" LoRA leaves those convs alone.
LORA_TYPES = {"LyCORIS/LoHa": "loha", "LyCORIS/LoCon": "locon", "Kohya LoCon": "lora"}
STANDARD = "Standard"
# kohya's save_precision "float" is fp32.
SAVE_PRECISIONS = {"float": "fp32", "fp16": "fp16", "bf16": "bf16"}
# kohya's sample defaults (sd-scripts' sample_image_inference), used for prompts without
# --s / --l: imported so the samples look like the GUI's.
KOHYA_SAMPLE_STEPS = 30
KOHYA_SAMPLE_CFG = 7.5
# Hub ids kohya_ss users give for SD 1.5; the appliance is offline and trains the pinned file.
SD15_HUB_IDS = ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")
SD15_PIN = "sd15"

_OFF = (None, "", 0, 0.0, False, "none", "None", [], {})

# --------------------------------------------------------------------------- values


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _fail(key: str, value: Any, wanted: str) -> MeebsError:
    return MeebsError(
        f"kohya_ss key {key}: expected {wanted}, got {_text(value)}; fix it in the config"
    )


def to_int(key: str, value: Any) -> int:
    """An integer, also from the strings and integral floats older GUIs wrote."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
            if number.is_integer():
                return int(number)
    raise _fail(key, value, "an integer")


def to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _fail(key, value, "a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _fail(key, value, "a number") from None


def to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise _fail(key, value, "true or false")


def to_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, "a string")
    return value


# Keys that map one to one: kohya key -> (recipe key, converter). An empty string or
# null means "not set" in the GUI, so the recipe keeps its default.
SIMPLE: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "train_data_dir": ("data.train_dir", to_str),
    "reg_data_dir": ("data.reg_dir", to_str),
    "enable_bucket": ("data.enable_bucket", to_bool),
    "min_bucket_reso": ("data.min_bucket_reso", to_int),
    "max_bucket_reso": ("data.max_bucket_reso", to_int),
    "bucket_reso_steps": ("data.bucket_reso_steps", to_int),
    "flip_aug": ("data.flip_aug", to_bool),
    "shuffle_caption": ("data.shuffle_caption", to_bool),
    "keep_tokens": ("data.keep_tokens", to_int),
    "caption_dropout_rate": ("data.caption_dropout_rate", to_float),
    "cache_latents": ("data.cache_latents", to_bool),
    "max_data_loader_n_workers": ("data.num_workers", to_int),
    "output_dir": ("output.dir", to_str),
    "output_name": ("output.name", to_str),
    "logging_dir": ("output.logging_dir", to_str),
    "training_comment": ("output.comment", to_str),
    "network_weights": ("network.weights", to_str),
    "network_dim": ("network.dim", to_int),
    "network_alpha": ("network.alpha", to_float),
    "train_batch_size": ("train.batch_size", to_int),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", to_int),
    "gradient_checkpointing": ("train.gradient_checkpointing", to_bool),
    "mixed_precision": ("train.mixed_precision", to_str),
    "learning_rate": ("train.learning_rate", to_float),
    "lr_scheduler": ("train.lr_scheduler", to_str),
    "lr_scheduler_power": ("train.lr_scheduler_power", to_float),
    "optimizer": ("train.optimizer", to_str),
    "max_token_length": ("train.max_token_length", to_int),
    "no_token_padding": ("train.no_token_padding", to_bool),
    "prior_loss_weight": ("train.prior_loss_weight", to_float),
    "max_grad_norm": ("train.max_grad_norm", to_float),
    "num_cpu_threads_per_process": ("train.threads", to_int),
    "sample_every_n_epochs": ("sample.every_n_epochs", to_int),
}
CONV_KEYS = {
    "conv_dim": ("network.conv_dim", to_int),
    "conv_alpha": ("network.conv_alpha", to_float),
}


def _choices(recipe_key: str) -> tuple[Any, ...]:
    """The values a recipe key allows when it is a fixed list (Literal), else ()."""
    section, name = recipe_key.split(".")
    section_type = typing.get_type_hints(Recipe)[section]
    hint = typing.get_type_hints(section_type)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


@dataclass(frozen=True)
class Converted:
    """The result of a conversion: the text to print and what the user must know."""

    text: str
    notes: tuple[str, ...]  # one line each, for stderr


# --------------------------------------------------------------------------- import


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
                    f"kohya_ss key {key}: {_text(value)} is not supported; use one of {choices}"
                )
            self.put(recipe_key, value)

    def unconverted(self) -> list[str]:
        """One line each for the keys set to something and for those left empty or off."""
        rest = {key: self.config[key] for key in sorted(self.config) if key not in self.used}
        active = [f"{key}={_text(value)}" for key, value in rest.items() if value not in _OFF]
        off = [key for key, value in rest.items() if value in _OFF]
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
    header = f"# converted by `import-kohya {path.name}`; every key: python entrypoint.py keys\n"
    body = yaml.safe_dump(_in_recipe_order(importer.raw), sort_keys=False, allow_unicode=True)
    return Converted(header + body, (*importer.notes, *importer.unconverted()))


def _kohya_key_hint(message: str) -> str:
    """Names the kohya_ss key behind the recipe key that a validation message names."""
    tables = (SIMPLE, CONV_KEYS, _EXPORTS)
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
        config = json.loads(read_text(path, "kohya_ss config"))
    except json.JSONDecodeError as error:
        raise MeebsError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno} ({error.msg}); "
            "give the file the GUI's 'Save config' wrote"
        ) from None
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
            f"{key}={_text(importer.take(key))}" for key in CONV_KEYS if key in importer.config
        ]
        if ignored:
            importer.notes.append(
                f"LoRA_type Standard trains no k x k convs: ignored {', '.join(ignored)}"
            )
        return
    if lora_type not in LORA_TYPES:
        allowed = ", ".join([*LORA_TYPES, STANDARD])
        raise MeebsError(
            f"kohya_ss key LoRA_type: {lora_type!r} is not supported; use one of {allowed}"
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
            f"max_train_steps {steps}: meebs trains whole epochs; set train.epochs so that "
            "`plan` shows about that many steps"
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
        if precision not in SAVE_PRECISIONS:
            raise MeebsError(
                f"kohya_ss key save_precision: {precision!r} is not one of "
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
            f"noise_offset_type {offset_type}: meebs has the Original noise offset only; "
            "the recipe trains without one"
        )


def _resolution(value: Any) -> list[int]:
    parts = str(value).replace(" ", "").split(",")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise _fail("max_resolution", value, 'width,height such as "512,512"')
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
        importer.notes.append(f"save_model_as {file_format}: meebs writes .safetensors only")


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


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """kohya's `optimizer_args` "weight_decay=0.01 betas=0.9,0.99" as a mapping."""
    args: dict[str, Any] = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _fail("optimizer_args", text, 'space-separated name=value pairs, e.g. "a=1 b=2"')
        parsed = [_literal(part) for part in value.split(",")]
        args[name] = parsed if len(parsed) > 1 else parsed[0]
    return args


def _literal(text: str) -> Any:
    """A Python literal as kohya reads it (ast.literal_eval), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def format_optimizer_args(args: dict[str, Any]) -> str:
    def value(item: Any) -> str:
        return ",".join(map(str, item)) if isinstance(item, list) else str(item)

    return " ".join(f"{name}={value(item)}" for name, item in args.items())


# --------------------------------------------------------------------------- export


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
_EXPORTS: dict[str, tuple[str, Callable[[Recipe], Any]]] = {
    "pretrained_model_name_or_path": ("model.path", lambda r: r.model.path or ""),
    "use_tucker": ("network.use_tucker", lambda r: r.network.use_tucker),
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
    for key, (recipe_key, value_of) in _EXPORTS.items():
        config[key] = value_of(recipe)
        used.add(recipe_key)
    if net.algo == "lora" and net.conv_dim == 0:
        config["LoRA_type"] = STANDARD
    else:
        config["LoRA_type"] = {algo: name for name, algo in LORA_TYPES.items()}[net.algo]
        config["conv_dim"], config["conv_alpha"] = net.conv_dim, net.conv_alpha
    return dict(sorted(config.items())), used
