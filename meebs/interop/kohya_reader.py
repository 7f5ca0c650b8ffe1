"""Reading one kohya_ss config, key by key, so that none is dropped silently.

Each part of the import (kohya_import, kohya_network, kohya_optim, kohya_refusals) takes
the keys it converts from a `KohyaReader` and puts recipe keys into it; whatever no part
took is listed in the notes (`unconverted`). It lives apart from `import_kohya` so that
those parts can use it without importing each other.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import Any

from meebs.errors import MeebsError
from meebs.files.text_files import shown
from meebs.interop.kohya_keys import value_text
from meebs.recipe.schema import Recipe

# What the GUI writes for a key it leaves empty or switched off.
OFF = (None, "", 0, 0.0, False, "none", "None", [], {})


@functools.cache  # typing.get_type_hints is slow: half of an import's time, uncached
def recipe_choices(recipe_key: str) -> tuple[Any, ...]:
    """The values a recipe key allows when it is a fixed list (Literal), else ()."""
    section, name = recipe_key.split(".")
    section_type = typing.get_type_hints(Recipe)[section]
    hint = typing.get_type_hints(section_type)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


class KohyaReader:
    """Reads one kohya config; `take` marks a key as converted, the rest are reported."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.used: set[str] = set()
        self.raw: dict[str, Any] = {}
        self.notes: list[str] = []
        self.fill_in: list[str] = []

    def take(self, key: str) -> Any:
        """The value of `key`, or None when absent or empty (the GUI's "not set")."""
        self.used.add(key)
        value = self.config.get(key)
        return None if value is None or value == "" else value

    def put(self, recipe_key: str, value: Any) -> None:
        section, name = recipe_key.split(".")
        self.raw.setdefault(section, {})[name] = value

    def get(self, recipe_key: str, default: Any = None) -> Any:
        section, name = recipe_key.split(".")
        return self.raw.get(section, {}).get(name, default)

    def simple(self, table: dict[str, tuple[str, Callable[[str, Any], Any]]]) -> None:
        for key, (recipe_key, convert) in table.items():
            value = self.take(key)
            if value is None:
                continue
            value = convert(key, value)
            allowed = recipe_choices(recipe_key)
            if allowed and value not in allowed:
                choices = ", ".join(map(str, allowed))
                raise MeebsError(
                    f"kohya_ss key {key}: {value_text(value)} is not supported; "
                    f"use one of {choices}"
                )
            self.put(recipe_key, value)

    def set_values(self, keys: typing.Iterable[str]) -> list[str]:
        """`key=value` for those of `keys` set to something, which count as reported; the
        ones empty or off are left to the "empty or off" line."""
        values = {key: self.config[key] for key in keys if key in self.config}
        listed = [key for key, value in values.items() if value not in OFF]
        self.used.update(listed)
        return [f"{shown(key)}={value_text(values[key])}" for key in listed]

    def unconverted(self) -> list[str]:
        """One line each for the keys set to something and for those left empty or off."""
        rest = {key: self.config[key] for key in sorted(self.config) if key not in self.used}
        active = [
            f"{shown(key)}={value_text(value)}" for key, value in rest.items() if value not in OFF
        ]
        off = [shown(key) for key, value in rest.items() if value in OFF]
        lines = []
        if active:
            lines.append("not converted (no meebs equivalent): " + ", ".join(active))
        if off:
            lines.append("not converted, empty or off in the config: " + ", ".join(off))
        return lines
