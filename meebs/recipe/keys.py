"""The recipe's keys as `section.key` paths: the table of every key (docs/recipes.md, `keys`,
`plan`) and the keys that differ between two recipes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from meebs.recipe.checks import type_name
from meebs.recipe.schema import Recipe


def documented_keys() -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) for every recipe key: the docs table and `plan`."""
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
                    type_name(section_hints[f.name]),
                    json.dumps(default),
                    f.metadata.get("doc", ""),
                )
            )
    return rows


def keys_markdown() -> str:
    """The table of recipe keys in docs/recipes.md (a test keeps the page in step with it)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, kind, default, doc in documented_keys():
        cells = (f"`{key}`", kind, f"`{default}`", doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


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
