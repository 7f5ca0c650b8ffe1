"""Reading the text files a user writes: recipes, captions, configs, lists.

Two mistakes used to end in a traceback or, worse, pass silently:

* A file saved in another encoding (a Latin-1 `café` in a comment, a caption from an old
  Windows tool) made Python raise `UnicodeDecodeError`. `read_text` names the file, the
  line and byte offset of the first bad byte, and the fix.
* A key written twice in one YAML mapping (two `train:` sections, `seed:` twice) was
  resolved to the last one by PyYAML, so the first edit was silently ignored.
  `load_yaml` refuses it, naming the dotted key and both lines.
* A hostile or broken file (found by fuzzing, issue 19) made the parsers raise
  RecursionError, ValueError or KeyError, or expand aliases ("billion laughs") until the
  machine ran out of memory. `load_yaml` and `load_json` refuse what no real file holds,
  in one line: nesting deeper than MAX_DEPTH, aliases that expand to more than MAX_NODES
  values or refer to themselves, integers of more than MAX_INT_DIGITS digits (Python
  cannot even print one of 4300), and values such as the date `2020-13-45`.

A leading UTF-8 byte-order mark (Notepad writes one) is accepted and dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.error import Mark
from yaml.nodes import CollectionNode, MappingNode, Node

from meebs.errors import MeebsError, quoted

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Far beyond any recipe, pins file or manifest (a recipe nests 3 levels deep and holds
# about 100 values), low enough that whatever walks or prints the result recursively
# keeps within Python's stack, memory and time.
MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_INT_DIGITS = 100


def shown(value: object, limit: int = 80) -> str:
    """`value` in a one-line message: as it is when it is a short printable string (a key
    such as `train.seed`), else `quoted` (repr'd and cut to `limit`)."""
    if isinstance(value, str) and value.isprintable() and len(value) <= limit:
        return value
    try:
        return quoted(value, limit)
    except ValueError:  # an integer too long to print, somewhere inside `value`
        return f"<a {type(value).__name__} too large to show>"


def read_text(path: Path, what: str, error: type[MeebsError] = MeebsError) -> str:
    """The UTF-8 text of `path`, which the user knows as `what` (e.g. "recipe").

    Raises `error`, one line naming the file, when it cannot be read or is not UTF-8.
    """
    named = shown(str(path), limit=300)  # a caption's name comes from a stranger's folder
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {named}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        where = _where(data, exc)
        raise error(f"{what} {named} is not UTF-8 text ({where}): save it as UTF-8") from None


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


class YamlLimitError(yaml.YAMLError):
    """A document beyond the limits above; str() is the one-line explanation."""

    def __init__(self, what: str, mark: Mark | None = None) -> None:
        super().__init__(f"line {mark.line + 1}: {what}" if mark else what)


class JsonLimitError(ValueError):
    """A JSON text beyond the limits above; str() is the one-line explanation."""


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Mappings are constructed parent first, so each one records the dotted path of its
    mapping values before they are built; a duplicate is then named `train.seed`, not
    just `seed`. Keys that `<<` merges in may be overridden, as YAML intends.

    It also keeps the limits above (YamlLimitError), and turns the ValueError or KeyError
    that PyYAML's own constructors raise for a bad scalar into a ConstructorError.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._paths: dict[Node, str] = {}
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        """PyYAML composes nested collections recursively: stop before Python's stack does."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError, OverflowError):  # `2020-13-45`, `!!bool maybe`
            kind = str(node.tag).rpartition(":")[2]
            problem = f"{quoted(node.value, 60)} is not a valid {kind}"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def construct_yaml_int(self, node: Node) -> int:
        if len(str(node.value)) > MAX_INT_DIGITS:
            raise YamlLimitError(
                f"an integer of more than {MAX_INT_DIGITS} digits", node.start_mark
            )
        return super().construct_yaml_int(node)

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
            try:
                duplicate = key in lines
            except TypeError:  # an unhashable key: SafeLoader itself reports it
                continue
            path = f"{parent}.{key}" if parent else str(key)
            if duplicate:
                raise DuplicateKeyError(shown(path), lines[key], line)
            lines[key] = line
            self._paths[value_node] = path


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)


def _check_expansion(root: Node) -> None:
    """Refuse a node graph whose aliases make it recursive, deeper than MAX_DEPTH or larger
    than MAX_NODES once expanded. Each node is measured once (aliases share nodes), so a
    "billion laughs" document costs as many steps as it has lines."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    unfinished: set[int] = set()  # nodes whose children are being measured
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_measured = stack.pop()
        key, children = id(node), _children(node)
        if children_measured:
            unfinished.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
        elif key in unfinished:
            raise YamlLimitError("an alias refers to a collection it is part of", node.start_mark)
        elif isinstance(node.value, str) and not _encodable(node.value):  # "\ud800"
            raise YamlLimitError("a string holds a lone surrogate: not text", node.start_mark)
        elif key not in size:
            unfinished.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    if depth[id(root)] > MAX_DEPTH:
        raise YamlLimitError(f"aliases nest the values deeper than {MAX_DEPTH} levels")
    if size[id(root)] > MAX_NODES:
        raise YamlLimitError(
            f"aliases expand to more than {MAX_NODES} values (a 'billion laughs' document?)"
        )


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [item for pair in node.value for item in pair]
    return list(node.value) if isinstance(node, CollectionNode) else []


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` that raises `DuplicateKeyError` for a key given twice and
    `YamlLimitError` beyond the limits above."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def load_json(text: str) -> Any:
    """`json.loads` within the limits above: JsonLimitError instead of the RecursionError
    (deep nesting) and ValueError (a 4300-digit integer) Python's parser raises, and for a
    lone surrogate such as "\\ud800" (no UTF-8 file or terminal can hold the text)."""
    try:
        data = json.loads(text, parse_int=_json_int)
    except RecursionError:
        raise JsonLimitError(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_json_values(data)
    return data


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _check_json_values(data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if level > MAX_DEPTH:
            raise JsonLimitError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((item, level + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((item, level + 1) for item in value)
        elif isinstance(value, str) and not _encodable(value):
            raise JsonLimitError(f"the string {shown(value, 40)} holds a lone surrogate")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
