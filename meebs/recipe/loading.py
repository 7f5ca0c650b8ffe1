"""Reading a recipe: the YAML file, the files it `extends:` and the command line.

`extends: other.yaml` inherits a recipe and overrides some keys; `key.path=value` on the
command line overrides after that (torchtune style). The result is checked strictly
(meebs.recipe.checks) before it becomes a `Recipe`.

Every way a file or an override can be wrong is one line (tests/fuzz/test_fuzz_recipe.py):
what the user typed is echoed through `shown`, so a newline or a megabyte in it never
breaks the line, and an `extends:` chain is at most MAX_EXTENDS files long.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from meebs.errors import RecipeError, quoted
from meebs.files.text_files import (
    DuplicateKeyError,
    YamlLimitError,
    load_yaml,
    read_text,
    shown,
)
from meebs.recipe.checks import build_checked
from meebs.recipe.schema import Recipe

# Two or three files extend each other in practice; a longer chain is a mistake (and each
# file is one more frame of Python's stack).
MAX_EXTENDS = 16


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
    return build_checked(Recipe, raw, where=where, prefix="", overridden=overridden)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not _is_file(path):
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = load_yaml(read_text(path, "recipe", RecipeError))
    except (DuplicateKeyError, YamlLimitError) as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        reason = _one_line(getattr(exc, "problem", None) or "invalid YAML")
        raise RecipeError(f"{path}:{line}: {reason}; check the indentation and quoting") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, data:, ...)")
    return data


def _is_file(path: Path) -> bool:
    """`Path.is_file`, False also where the name itself is impossible (too long: OSError)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _one_line(text: str, limit: int = 200) -> str:
    """A parser's explanation on one line, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Load one file and, if it says `extends:`, the file it extends underneath it."""
    resolved = path.resolve()
    if resolved in chain:
        loop = _one_line(" -> ".join(p.name for p in (*chain, resolved)), limit=300)
        raise RecipeError(f"{path}: extends loops back on itself ({shown(loop, 300)})")
    if len(chain) >= MAX_EXTENDS:
        raise RecipeError(
            f"{path}: extends: more than {MAX_EXTENDS} files extend each other; "
            "merge some of them into one recipe"
        )
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise RecipeError(f"{path}: extends: expected a file name such as 1.1.yaml")
    parent_path = path.parent / parent
    if not _is_file(parent_path):
        raise RecipeError(
            f"{path}: extends: {shown(parent)}: no such recipe next to it; "
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
            f"command line: {quoted(item)}: an override looks like section.key=value, "
            "e.g. train.epochs=3"
        )
    try:
        value = load_yaml(text) if text != "" else ""
    except yaml.YAMLError:
        raise RecipeError(
            f"command line: {shown(key_path)}: cannot read the value {quoted(text)}"
        ) from None
    *parents, leaf = key_path.split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise RecipeError(f"command line: {shown(key_path)}: {shown(name)} is not a section")
        node = child
    node[leaf] = value
    return key_path
