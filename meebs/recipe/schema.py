"""Recipes: the YAML file that says everything about one training run.

A recipe is validated strictly, because a typo that silently falls back to a default
wastes a GPU-day: an unknown key, a wrong type, an out-of-range value or a combination
that cannot work stops the run with one line naming the file, the key path and what is
allowed. `extends: other.yaml` inherits a recipe and overrides some keys;
`key.path=value` on the command line overrides after that (torchtune style).

The resolved recipe is frozen and has a canonical hash, so a run can name exactly what
it was asked to do.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from meebs.errors import RecipeError
from meebs.files.text_files import DuplicateKeyError, load_yaml, read_text

WHERE_KEYS = ("dir", "logging_dir")  # output.* keys that never change what is trained
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "polynomial",
    "cosine",
    "cosine_with_restarts",
)


def knob(default: Any, doc: str, lo: float | None = None, hi: float | None = None) -> Any:
    """A recipe key with its default, one line of documentation and an inclusive range."""
    meta = {"lo": lo, "hi": hi, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """The base model: a built-in test model, a diffusers folder or a single file."""

    builtin: Literal["tiny", "tiny-trained", "sd15-random"] | None = knob(
        None,
        "built-in model: tiny (random; tests), tiny-trained (the demos) or sd15-random "
        "(full size, random weights)",
    )
    path: str | None = knob(None, "SD 1.5 diffusers folder or single-file .safetensors")
    sha256: str | None = knob(None, "pin: the run stops if the base model's sha256 differs")
    allow_pickle: bool = knob(False, "allow pickle files (.ckpt/.bin): they can run code")


@dataclass(frozen=True)
class DataSection:
    """Images, captions and how they become training tensors."""

    train_dir: str = knob("", "folder of `{repeats}_{subject} {class}` subfolders")
    reg_dir: str | None = knob(None, "regularization folder, same convention (kohya reg_data_dir)")
    caption_extension: str = knob(".txt", "caption file extension next to each image")
    resolution: list[int] = knob([512, 512], "max training resolution [width, height]")
    enable_bucket: bool = knob(False, "aspect-ratio bucketing")
    min_bucket_reso: int = knob(256, "smallest bucket side", lo=64)
    max_bucket_reso: int = knob(1024, "largest bucket side", lo=64)
    bucket_reso_steps: int = knob(64, "bucket sides are multiples of this", lo=8)
    background: Literal["white", "black", "alternate"] = knob(
        "white", "background that transparent images are flattened onto"
    )
    flip_aug: bool = knob(False, "random horizontal flips")
    shuffle_caption: bool = knob(False, "shuffle comma-separated caption tags")
    keep_tokens: int = knob(0, "leading caption tags kept in place when shuffling", lo=0)
    caption_dropout_rate: float = knob(0.0, "probability of an empty caption", lo=0.0, hi=1.0)
    cache_latents: bool = knob(True, "encode every image once with the VAE, before training")
    cache_latents_to_disk: bool = knob(
        True, "keep cached latents on disk ($MEEBS_CACHE_DIR/latents) for later runs"
    )
    num_workers: int = knob(0, "data-loader worker processes", lo=0, hi=64)


@dataclass(frozen=True)
class OutputSection:
    """Where files go and which ones are written."""

    dir: str = knob("outputs", "runs are written to {dir}/{name}/{run id}/")
    name: str = knob("", "output name: file stem of every network file")
    logging_dir: str | None = knob(None, "TensorBoard folder (default: {run}/logs)")
    comment: str = knob("", "training comment stored in the file (ss_training_comment)")
    save_every_n_epochs: int = knob(1, "write {name}-{epoch:06d}.safetensors every N epochs", lo=1)
    keep_last_n_epochs: int | None = knob(None, "keep only the last N epoch files", lo=1)
    save_precision: Literal["fp16", "bf16", "fp32"] = knob("fp16", "dtype of saved tensors")


@dataclass(frozen=True)
class NetworkSection:
    """The LyCORIS network that is trained."""

    algo: Literal["loha", "locon", "lora"] = knob("loha", "network type")
    dim: int = knob(4, "rank of Linear and 1x1 conv layers (network_dim)", lo=1, hi=1024)
    alpha: float = knob(1.0, "scale = alpha / dim (network_alpha)", lo=0.0)
    conv_dim: int = knob(4, "rank of 3x3 convs; 0 skips them", lo=0, hi=1024)
    conv_alpha: float = knob(1.0, "scale of 3x3 convs = conv_alpha / conv_dim", lo=0.0)
    use_tucker: bool = knob(False, "Tucker decomposition for 3x3 convs")
    weights: str | None = knob(None, "start from this network file (kohya network_weights)")


@dataclass(frozen=True)
class TrainSection:
    """The optimisation: steps, learning rates, loss and the machine."""

    seed: int = knob(42, "seed of every random source", lo=0)
    epochs: int = knob(1, "passes over the training images (with their reg partners)", lo=1)
    batch_size: int = knob(1, "images per step per device", lo=1, hi=256)
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", lo=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = knob("no", "autocast precision (GPU)")
    learning_rate: float = knob(1e-4, "default learning rate", lo=0.0)
    unet_lr: float | None = knob(None, "UNet LR (default learning_rate; 0 = don't train)", lo=0.0)
    text_encoder_lr: float | None = knob(
        None, "text-encoder LR (default learning_rate; 0 = don't train)", lo=0.0
    )
    lr_scheduler: Literal[SCHEDULERS] = knob("constant", "learning-rate schedule")  # type: ignore[valid-type]
    lr_warmup: float = knob(0.0, "warmup as a fraction of all steps", lo=0.0, hi=1.0)
    lr_scheduler_num_cycles: int = knob(1, "cycles of cosine_with_restarts", lo=1)
    lr_scheduler_power: float = knob(1.0, "power of the polynomial schedule", lo=0.0)
    optimizer: Literal["AdamW", "AdamW8bit", "Prodigy"] = knob("AdamW", "optimizer")
    optimizer_args: dict[str, Any] = knob({}, "extra optimizer keyword arguments")
    max_token_length: Literal[75, 150, 225] = knob(75, "caption tokens (chunks of 75)")
    no_token_padding: bool = knob(False, "pad captions to the longest in the batch only")
    clip_skip: int = knob(1, "use the n-th last text-encoder layer (1 = last)", lo=1, hi=12)
    noise_offset: float = knob(0.0, "noise += offset * randn(B, C, 1, 1)", lo=0.0, hi=1.0)
    min_snr_gamma: float | None = knob(None, "min-SNR loss weighting gamma (5 is common)", lo=0.0)
    prior_loss_weight: float = knob(1.0, "loss weight of regularization images", lo=0.0)
    max_grad_norm: float = knob(1.0, "gradient clipping norm (0 = off)", lo=0.0)
    attention: Literal["sdpa", "xformers"] = knob("sdpa", "attention backend")
    gradient_checkpointing: bool = knob(False, "trade compute for memory")
    loha_layer: Literal["fast", "low-memory", "lycoris"] = knob(
        "fast", "LoHA training layer: same function; low-memory saves RAM/VRAM, lycoris = stock"
    )
    threads: int = knob(2, "CPU threads (part of the result: it changes the bits)", lo=1)
    log_every_n_steps: int = knob(
        10, "read losses back and log them every N steps (each read waits for the GPU)", lo=1
    )
    deterministic: bool = knob(
        True, "deterministic kernels, TF32 off (off: faster on GPU, bits may differ)"
    )


@dataclass(frozen=True)
class SampleSection:
    """Sample images generated during training."""

    every_n_epochs: int = knob(0, "generate samples every N epochs (0 = never)", lo=0)
    prompts: list[str] = knob([], "prompts; kohya flags --n --w --h --d --s --l allowed")
    prompt_file: str | None = knob(None, "kohya prompt file, one prompt per line")
    sampler: str = knob("Euler a", "AUTOMATIC1111 sampler name")
    steps: int = knob(20, "sampling steps", lo=1, hi=1000)
    cfg: float = knob(7.0, "classifier-free guidance scale", lo=0.0)
    seed: int = knob(1234, "seed of the first prompt (+1 per prompt)", lo=0)
    negative: str = knob("", "default negative prompt")


@dataclass(frozen=True)
class ValidationSection:
    """Held-out images scored during training, to pick the epoch that learned most."""

    enabled: bool = knob(False, "score held-out images and class drift; recommend an epoch")
    fraction: float = knob(
        0.1, "share of each training folder held out (at least 1 image per folder)", lo=0.0, hi=1.0
    )
    seed: int = knob(
        0, "seed of the held-out split (its own: changing it changes only the split)", lo=0
    )
    folder: str | None = knob(
        None, "validation folder in kohya layout, used instead of holding out `fraction`"
    )
    every_n_epochs: int = knob(
        1, "evaluate every N epochs (and at epoch 0 and every saved epoch)", lo=1
    )
    timesteps: int = knob(
        8, "noise levels per image, spread evenly over the schedule", lo=3, hi=1000
    )
    class_images: int = knob(8, "reg images scored for class drift (a fixed subset)", lo=1)
    drift_tolerance: float = knob(
        0.05,
        "largest class drift allowed for the recommendation, as a share of the base loss",
        lo=0.0,
    )


@dataclass(frozen=True)
class Recipe:
    """A fully resolved, validated recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    output: OutputSection = field(default_factory=OutputSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        """The recipe as compact sorted JSON, without the keys that only say *where* files
        go: the same recipe written to another folder is the same training, and gives the
        same bytes."""
        data = self.to_dict()
        for key in WHERE_KEYS:
            del data["output"][key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def unet_lr(self) -> float:
        lr = self.train.unet_lr
        return self.train.learning_rate if lr is None else lr

    @property
    def text_encoder_lr(self) -> float:
        lr = self.train.text_encoder_lr
        return self.train.learning_rate if lr is None else lr

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (following `extends:`), apply `key=value` overrides, validate."""
    raw = _read_with_extends(Path(path), chain=())
    return recipe_from_dict(raw, where=str(path), overrides=overrides)


def recipe_from_dict(
    raw: dict[str, Any], *, where: str, overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Validate an already-read recipe mapping (a run's manifest holds one)."""
    raw = copy.deepcopy(raw)
    overridden = {_apply_override(raw, item) for item in overrides}
    return _build(Recipe, raw, where=where, prefix="", overridden=overridden)


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """`section.key: old -> new` for every key that changes what is trained."""
    before, after = _flat(json.loads(old.canonical_json())), _flat(json.loads(new.canonical_json()))
    return [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and prefix == "":
            flat.update(_flat(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = load_yaml(read_text(path, "recipe", RecipeError))
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}:{line}: {reason}; check the indentation and quoting") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, data:, ...)")
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Load one file and, if it says `extends:`, the file it extends underneath it."""
    resolved = path.resolve()
    if resolved in chain:
        loop = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{path}: extends loops back on itself ({loop})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a file name such as 1.1.yaml")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise RecipeError(
            f"{path}: extends: {parent}: no such recipe next to it ({parent_path}); "
            "name a recipe file in the same folder"
        )
    base = _read_with_extends(parent_path, (*chain, resolved))
    return _deep_merge(base, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one `section.key=value` override; the value is parsed as YAML (3, true, [1,2])."""
    key_path, sep, text = item.partition("=")
    if not sep or not key_path or "." not in key_path:
        raise RecipeError(
            f"command line: {item!r}: an override looks like section.key=value, e.g. train.epochs=3"
        )
    try:
        value = load_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        raise RecipeError(f"command line: {key_path}: cannot read the value {text!r}") from None
    *parents, leaf = key_path.split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise RecipeError(f"command line: {key_path}: {name} is not a section")
        node = child
    node[leaf] = value
    return key_path


# --------------------------------------------------------------------------- validation


def _build(cls: type, raw: Any, *, where: str, prefix: str, overridden: set[str]) -> Any:
    """Turn a mapping into the dataclass `cls`, checking every key and value.

    `overridden` holds the key paths set on the command line: their errors say so.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: {prefix.rstrip('.') or 'recipe'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)

    def origin(key: str) -> str:
        return _origin(f"{prefix}{key}", where, overridden)

    for key in raw:
        if key not in fields:
            suggestion = _suggest(key, fields, prefix)
            raise RecipeError(f"{origin(key)}: {prefix}{key}: unknown key{suggestion}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(
                hint, raw[name], where=where, prefix=f"{prefix}{name}.", overridden=overridden
            )
        else:
            key = f"{prefix}{name}"
            values[name] = _check_value(raw[name], hint, f.metadata, origin(name), key)
    recipe = cls(**values)
    if cls is Recipe:
        _check_combinations(recipe, where, overridden)
    return recipe


def _origin(key_path: str, where: str, overridden: set[str]) -> str:
    """Who set `key_path`: "command line" when an override set it or a key below it (an
    override `trian.seed=1` creates the unknown section `trian`), else the recipe file."""
    below = key_path + "."
    if any(item == key_path or item.startswith(below) for item in overridden):
        return "command line"
    return where


def _suggest(key: str, fields: typing.Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    allowed = ", ".join(sorted(fields))
    return f"; did you mean {prefix}{close[0]}?" if close else f"; allowed: {allowed}"


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, str(hint))


def _check_value(value: Any, hint: Any, meta: Any, where: str, key: str) -> Any:
    """Check one value against its type hint and range; return it normalised."""
    checked = _coerce(value, hint)
    if checked is _INVALID:
        raise RecipeError(f"{where}: {key}: expected {_type_name(hint)}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    numbers = checked if isinstance(checked, list) else [checked]
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise RecipeError(f"{where}: {key}: {number} is out of range: must be {bounds}")
    return checked


_INVALID = object()


def _coerce(value: Any, hint: Any) -> Any:
    """Return `value` as type `hint`, or _INVALID. Only lossless conversions are made."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            result = _coerce(value, arg)
            if result is not _INVALID:
                return result
        return _INVALID
    if origin is Literal:
        if value is False and "no" in args:
            return "no"  # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means "no"
        return value if value in args and type(value) in {type(a) for a in args} else _INVALID
    if origin is list:
        if hint == list[int] and isinstance(value, int) and not isinstance(value, bool):
            return [value, value]  # a single resolution number means a square
        if not isinstance(value, list):
            return _INVALID
        items = [_coerce(v, args[0]) for v in value]
        return _INVALID if any(i is _INVALID for i in items) else items
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _INVALID
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                return _INVALID
        return float(value) if isinstance(value, (int, float)) else _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    return _INVALID


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_combinations(recipe: Recipe, where: str, overridden: set[str]) -> None:
    """Rules that involve more than one key."""
    model, data, train, out = recipe.model, recipe.data, recipe.train, recipe.output

    def fail(key: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{_origin(key, where, overridden)}: {key}: {message}")

    if (model.builtin is None) == (model.path is None):
        fail(
            "model",
            "set exactly one of model.builtin (tiny, tiny-trained, sd15-random) or model.path",
        )
    if model.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", model.sha256):
        fail("model.sha256", "expected 64 lowercase hex digits")
    if not data.train_dir:
        fail("data.train_dir", "required: the folder that holds the `50_meeb person` folders")
    if len(data.resolution) != 2:
        fail("data.resolution", "expected one number or [width, height]")
    for side in data.resolution:
        if side < 64 or side % 8:
            fail("data.resolution", f"{side}: sides must be multiples of 8, at least 64")
    if data.enable_bucket and data.min_bucket_reso > data.max_bucket_reso:
        fail("data.min_bucket_reso", "must not exceed data.max_bucket_reso")
    if not data.caption_extension.lstrip("."):
        fail("data.caption_extension", "expected an extension such as .txt or .caption")
    if not _NAME.match(out.name):
        fail("output.name", "required; letters, digits, '.', '_' and '-' only (it is a file name)")
    if train.lr_scheduler == "constant" and train.lr_warmup > 0:
        fail(
            "train.lr_warmup",
            "the constant scheduler has no warmup: use constant_with_warmup or set it to 0",
        )
    if recipe.unet_lr == 0 and recipe.text_encoder_lr == 0:
        fail("train.unet_lr", "both unet_lr and text_encoder_lr are 0: nothing would be trained")
    if recipe.network.conv_dim == 0 and recipe.network.use_tucker:
        fail("network.use_tucker", "Tucker applies to 3x3 convs, but network.conv_dim is 0")
    if recipe.sample.every_n_epochs and not (recipe.sample.prompts or recipe.sample.prompt_file):
        fail("sample.every_n_epochs", "set sample.prompts or sample.prompt_file as well")
    val = recipe.validation
    if val.enabled and val.folder is None and not 0 < val.fraction < 1:
        fail("validation.fraction", "must be between 0 and 1 (exclusive), or set validation.folder")


def documented_keys() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) for every recipe key: the README table and `plan`."""
    rows = []
    hints = typing.get_type_hints(Recipe)
    for section in dataclasses.fields(Recipe):
        cls = hints[section.name]
        section_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append(
                (
                    f"{section.name}.{f.name}",
                    _type_name(section_hints[f.name]),
                    json.dumps(default),
                    f.metadata.get("doc", ""),
                )
            )
    return rows


def keys_markdown() -> str:
    """The README's table of recipe keys (a test keeps the README in step with it)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, kind, default, doc in documented_keys():
        cells = (f"`{key}`", kind, f"`{default}`", doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
