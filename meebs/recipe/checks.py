"""Checking a recipe strictly, because a typo that silently falls back to a default
wastes a GPU-day: an unknown key, a wrong type, an out-of-range value or a combination
that cannot work stops the run with one line naming the file, the key path and what is
allowed. What the user wrote is echoed through `shown` and `quoted` (a key or value with a
newline, or a megabyte of it, must not break that line), numbers must be finite, and
`train.optimizer_args` holds plain JSON values only: the recipe's hash is its JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from typing import Any, Literal

from meebs.errors import RecipeError, quoted
from meebs.files.text_files import MAX_INT_DIGITS, shown
from meebs.recipe.options import option_problem
from meebs.recipe.schema import Recipe


def build_checked(cls: type, raw: Any, *, where: str, prefix: str, overridden: set[str]) -> Any:
    """Turn a mapping into the dataclass `cls`, checking every key and value.

    `overridden` holds the key paths set on the command line: their errors say so.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: {prefix.rstrip('.') or 'recipe'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)

    def origin(key: str) -> str:
        return _origin(f"{prefix}{key}", where, overridden)

    for key in raw:
        if key not in fields:
            suggestion = _suggest(key, fields, prefix)
            raise RecipeError(f"{origin(key)}: {shown(f'{prefix}{key}')}: unknown key{suggestion}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build_checked(
                hint, raw[name], where=where, prefix=f"{prefix}{name}.", overridden=overridden
            )
        else:
            key = f"{prefix}{name}"
            values[name] = _check_value(raw[name], hint, f.metadata, origin(name), key)
    recipe = cls(**values)
    if cls is Recipe:
        _check_combinations(recipe, where, overridden)
    return recipe


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints, once per section: it is most of the time a check takes."""
    return typing.get_type_hints(cls)


def _origin(key_path: str, where: str, overridden: set[str]) -> str:
    """Who set `key_path`: "command line" when an override set it or a key below it (an
    override `trian.seed=1` creates the unknown section `trian`), else the recipe file."""
    below = key_path + "."
    if any(item == key_path or item.startswith(below) for item in overridden):
        return "command line"
    return where


def _suggest(key: Any, fields: typing.Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1) if isinstance(key, str) else []
    allowed = ", ".join(sorted(fields))
    return f"; did you mean {prefix}{close[0]}?" if close else f"; allowed: {allowed}"


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"a list of {type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, str(hint))


def _check_value(value: Any, hint: Any, meta: Any, where: str, key: str) -> Any:
    """Check one value against its type hint and range; return it normalised."""
    checked = _coerce(value, hint)
    if checked is _INVALID:
        raise RecipeError(f"{where}: {key}: expected {type_name(hint)}, got {quoted(value)}")
    if typing.get_origin(hint) is dict and not _plain(checked):
        raise RecipeError(
            f"{where}: {key}: expected names with numbers, strings, true/false or lists of "
            f"them, got {quoted(value)}"
        )
    lo, hi = meta.get("lo"), meta.get("hi")
    numbers = checked if isinstance(checked, list) else [checked]
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise RecipeError(f"{where}: {key}: {number} is not a finite number")
        if abs(number) >= 10**MAX_INT_DIGITS:  # a kohya "epoch": 1e100; no YAML reads it back
            raise RecipeError(f"{where}: {key}: over {MAX_INT_DIGITS} digits is out of range")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise RecipeError(f"{where}: {key}: {number} is out of range: must be {bounds}")
    return checked


_INVALID = object()


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether `value` is a finite JSON value (optimizer arguments are hashed as JSON)."""
    if depth > 8:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(item, depth + 1) for item in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


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


# fullmatch (`$` matches before a "\n"); at most 200, as "{name}_e000001_s000060_00.png"
# and the other file names made of it must stay within a file system's 255 bytes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_EXTENSION = re.compile(r"[^\s/\\]+")  # a file name's end: no space, no folder separator


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
    extension = data.caption_extension.lstrip(".")
    if not (_EXTENSION.fullmatch(extension) and extension.isprintable()):
        fail("data.caption_extension", "expected an extension such as .txt or .caption")
    if not _NAME.fullmatch(out.name):
        fail(
            "output.name",
            "required; up to 200 letters, digits, '.', '_' and '-' (it is a file name)",
        )
    if train.lr_scheduler == "constant" and train.lr_warmup > 0:
        fail(
            "train.lr_warmup",
            "the constant scheduler has no warmup: use constant_with_warmup or set it to 0",
        )
    if recipe.unet_lr == 0 and recipe.text_encoder_lr == 0:
        fail("train.unet_lr", "both unet_lr and text_encoder_lr are 0: nothing would be trained")
    if recipe.network.conv_dim == 0 and recipe.network.use_tucker:
        fail("network.use_tucker", "Tucker applies to 3x3 convs, but network.conv_dim is 0")
    problem = option_problem(recipe.network)
    if problem:
        fail(*problem)
    if recipe.sample.every_n_epochs and not (recipe.sample.prompts or recipe.sample.prompt_file):
        fail("sample.every_n_epochs", "set sample.prompts or sample.prompt_file as well")
    val = recipe.validation
    if val.enabled and val.folder is None and not 0 < val.fraction < 1:
        fail("validation.fraction", "must be between 0 and 1 (exclusive), or set validation.folder")
