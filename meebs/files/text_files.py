"""Reading the text files a user writes: recipes, captions, configs, lists.

Two mistakes used to end in a traceback or, worse, pass silently:

* A file saved in another encoding (a Latin-1 `café` in a comment, a caption from an old
  Windows tool) made Python raise `UnicodeDecodeError`. `read_text` names the file, the
  line and byte offset of the first bad byte, and the fix.
* A key written twice in one YAML mapping (two `train:` sections, `seed:` twice) was
  resolved to the last one by PyYAML, so the first edit was silently ignored.
  `load_yaml` refuses it, naming the dotted key and both lines.

A leading UTF-8 byte-order mark (Notepad writes one) is accepted and dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node

from meebs.errors import MeebsError

_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_text(path: Path, what: str, error: type[MeebsError] = MeebsError) -> str:
    """The UTF-8 text of `path`, which the user knows as `what` (e.g. "recipe").

    Raises `error`, one line naming the file, when it cannot be read or is not UTF-8.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = _where(data, exc)
        raise error(f"{what} {path} is not UTF-8 text ({where}): save it as UTF-8") from None


def _where(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 is: "byte 0xe9 at line 3, offset 57"."""
    skipped = len(data) - len(exc.object)  # utf-8-sig decodes after the byte-order mark
    offset = skipped + exc.start
    line = data.count(b"\n", 0, offset) + 1
    return f"byte 0x{data[offset]:02x} at line {line}, offset {offset}"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; str() is the one-line explanation."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(
            f"{key} is given twice (lines {first_line} and {second_line}); keep one of them"
        )


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Mappings are constructed parent first, so each one records the dotted path of its
    mapping values before they are built; a duplicate is then named `train.seed`, not
    just `seed`. Keys that `<<` merges in may be overridden, as YAML intends.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._paths: dict[Node, str] = {}

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            self._check_unique(node)
        return super().construct_mapping(node, deep=deep)

    def _check_unique(self, node: MappingNode) -> None:
        parent = self._paths.get(node)
        lines: dict[Any, int] = {}  # key -> line it was first given on
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            path = f"{parent}.{key}" if parent else str(key)
            try:
                if key in lines:
                    raise DuplicateKeyError(path, lines[key], line)
                lines[key] = line
            except TypeError:  # an unhashable key: SafeLoader itself reports it
                continue
            self._paths[value_node] = path


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` that raises `DuplicateKeyError` for a key given twice."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
