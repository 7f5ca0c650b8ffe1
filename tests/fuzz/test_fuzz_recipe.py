"""Fuzzing the recipe loader (issue 19): YAML text -> resolved recipe, following `extends:`
and applying command-line `section.key=value` overrides.

Property (fuzz/one_line.py): any input gives a `Recipe` or a `MeebsError` of one line,
never another exception and never a hang. A recipe that loads is also usable: it has a
hash (its numbers are finite, its strings UTF-8 text), its `output.name` is a plain file
name, its seeds are ones torch takes, and its YAML dump loads back to the same recipe.

Inputs: random text; the real recipes in recipes/ with one key dropped, retyped or set
to a strange value (NaN, huge integers, -0, newlines, NUL, deep lists); the real text
with random edits; random overrides; and folders of files that extend each other, a
missing file, a folder, themselves, or a chain longer than the limit.

Bound: a recipe of at most 64 KiB is read within 5 s (the deadline of every example, and
`test_worst_cases_stay_within_the_bound` for the worst inputs known, measured) and with
at most 64 MiB of Python allocations at peak (tracemalloc), alias bombs included.

The strategies, the bound and `check_usable` here are shared by the other parsers' files.
"""

from __future__ import annotations

import json
import operator
import os
import re
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fuzz.one_line import result_or_one_line
from meebs.errors import MeebsError, RecipeError
from meebs.recipe.keys import documented_keys
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE_FILES = {path.name: path.read_text(encoding="utf-8") for path in REPO.glob("recipes/*.yaml")}
RECIPES = {name: yaml.safe_load(text) for name, text in RECIPE_FILES.items()}
KEYS = [key for key, *_ in documented_keys()]
SECTIONS = sorted({key.split(".")[0] for key in KEYS})

MINIMAL = "model: {builtin: tiny}\ndata: {train_dir: d}\noutput: {name: x}\n"
BOUND_SECONDS = 5.0
BOUND_BYTES = 64 * 2**20
# The worst cases are built this large in `make fuzz`; an eighth of it keeps `make test` fast
# (each is run twice, and tracemalloc slows pure-Python parsing several times over).
INPUT_BYTES = 64 * 2**10 if settings.default.max_examples >= 10_000 else 8 * 2**10

# Strings that break parsers: YAML 1.1 look-alikes, numbers in disguise, line and path
# separators, a byte-order mark, long lines, a number with more digits than Python prints.
WEIRD_STRINGS = [
    "",
    " ",
    "\n",
    "a\nb",
    "\r",
    "\x00",
    "\t",
    "\u2028",
    "\ufeff",
    "\x85",
    "-0",
    "-0.0",
    "nan",
    ".nan",
    "NaN",
    "inf",
    "-.inf",
    "1e999",
    "1e-4",
    "0x10",
    "0o7",
    "1_000",
    "1:20:30",
    "２５６",
    "no",
    "off",
    "yes",
    "null",
    "~",
    "true",
    "2020-13-45",
    "!!python/object:os.system",
    "*a",
    "&a",
    "<<",
    "../../etc/passwd",
    "/",
    ".",
]
# ... and long ones (built by a strategy: hypothesis' statistics print a list in full)
long_strings = st.builds(
    operator.mul, st.sampled_from(["x", "9", "a\n"]), st.sampled_from([2000, 5000])
)
weird_strings = st.sampled_from(WEIRD_STRINGS) | long_strings
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=10**80, max_value=10**99),
    st.floats(),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e308]),
    st.text(max_size=30),
    weird_strings,
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=16,
)
# A value nested far deeper than any recipe, as a parser would meet it in a file.
deep_values = st.integers(min_value=1, max_value=100).map(lambda n: _nest([], n))


# Every example writes its files into a fresh folder: in memory (/dev/shm) where the
# machine has one, since on a journaled disk the writes were most of the tests' time.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="meebs-fuzz-", dir=SCRATCH)


def _nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=4096)


# --------------------------------------------------------------------------- the property


def check_load(folder: Path, name: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Load `folder/name`: a usable recipe, or one line."""
    result = result_or_one_line(load_recipe, folder / name, list(overrides))
    if isinstance(result, Recipe):
        check_usable(result, folder)


def check_usable(recipe: Recipe, folder: Path) -> None:
    """What every verb does with a recipe next: hash it, name files after it, seed torch
    with it, write it. Its numbers are finite (the hash is JSON, and a NaN learning rate
    trains nothing)."""
    json.loads(recipe.canonical_json(), parse_constant=_not_finite)
    json.dumps(recipe.to_dict(), ensure_ascii=False).encode()  # text, as file metadata must be
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", recipe.output.name)  # file names
    assert recipe.train.seed < 2**63 and recipe.sample.seed < 2**63  # what manual_seed takes
    again = folder / "dumped-again.yaml"
    again.write_text(recipe.to_yaml(), encoding="utf-8")
    assert load_recipe(again).canonical_json() == recipe.canonical_json()


def _not_finite(constant: str) -> None:
    raise AssertionError(f"the recipe holds {constant}")


def in_folder(
    files: dict[str, str | bytes], name: str, overrides: list[str] | tuple[str, ...] = ()
):
    """Write `files` (with the real recipes next to them, for `extends:`) and load `name`."""
    with scratch() as tmp:
        folder = Path(tmp)
        for real, text in RECIPE_FILES.items():
            (folder / real).write_text(text, encoding="utf-8")
        (folder / "a-folder.yaml").mkdir()
        for file_name, content in files.items():
            path = folder / file_name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8", errors="surrogatepass")
        check_load(folder, name, overrides)


# --------------------------------------------------------------------------- random text


@given(st.text(max_size=2000))
@example("1: 2")  # a key that is not a string: difflib raised TypeError
@example("model:\n  ~: 1")
@example('"a\\nb": 1')  # a newline in an unknown key broke the line
@example('model:\n  "a\\nb": 1\n  "a\\nb": 2\n')  # ... and in a key given twice
@example("[" * 5000)  # RecursionError in PyYAML's composer
@example(MINIMAL + "train: {seed: 1" + ":00" * 3000 + "}")  # an int Python cannot print
@example(MINIMAL + "train: {seed: 0x" + "f" * 4000 + "}")  # ditto
@example(MINIMAL + "train: {seed: 9223372036854775808}")  # torch.manual_seed refuses it
@example(MINIMAL + "train: {optimizer_args: {when: 2020-01-01}}")  # a date: no JSON hash
@example(MINIMAL + "train: {learning_rate: .nan}")  # a NaN learning rate was accepted
@example(MINIMAL + 'sample: {negative: "\\ud800"}')  # a lone surrogate: no UTF-8 for it
@example("train: {seed: 2020-13-45}")  # ValueError from PyYAML's date constructor
@example("train: {seed: !!bool maybe}")  # KeyError from PyYAML's bool constructor
@example("train: {seed: !!int x}")
@example("x: !<" + "t" * 3000 + "> 1")  # PyYAML's own message echoes the tag: 3000 chars
def test_random_text(text):
    in_folder({"r.yaml": text}, "r.yaml")


@given(st.binary(max_size=2000))
# edge cases that never failed: a byte-order mark, half of one, Latin-1
@example(b"\xef\xbb\xbfmodel: {builtin: tiny}\n")
@example(b"\xef\xbb")
@example(b"model: {builtin: caf\xe9}\n")
def test_random_bytes(data):
    in_folder({"r.yaml": data}, "r.yaml")


# --------------------------------------------------------------------------- real recipes, mutated


@st.composite
def mutated_recipes(draw) -> dict[str, Any]:
    """A real recipe with one to three keys dropped, set to a strange value or added."""
    raw = yaml.safe_load(dump(RECIPES[draw(st.sampled_from(sorted(RECIPES)))]))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([*SECTIONS, "extends", "trian", ""]))
        known = [key.split(".")[1] for key in KEYS if key.startswith(f"{section}.")]
        key = draw(st.sampled_from(known) | st.text(max_size=12)) if known else None
        value = draw(json_values | deep_values)
        action = draw(st.sampled_from(["drop", "set", "set", "set", "section"]))
        if action == "section" or key is None:
            raw[section] = value
        elif action == "drop" and isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
        elif isinstance(raw.get(section), dict):
            raw[section][key] = value
        else:
            raw[section] = {key: value}
    return raw


@given(mutated_recipes())
@example({"model": {"builtin": "tiny"}, "data": {"train_dir": "d"}, "output": {"name": "x\n"}})
@example({"model": {"builtin": "tiny"}, "data": {"train_dir": "d"}, "output": {"name": "x" * 300}})
@example(
    {
        "model": {"builtin": "tiny"},
        "data": {"train_dir": "d"},
        "output": {"name": "x"},
        "train": {"max_grad_norm": float("inf")},
    }
)
def test_mutated_real_recipes(raw):
    in_folder({"r.yaml": dump(raw)}, "r.yaml")


@given(st.sampled_from(sorted(RECIPE_FILES)), st.data())
def test_real_recipe_text_with_random_edits(name, data):
    text = RECIPE_FILES[name]
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 40)))
        text = text[:start] + data.draw(st.text(max_size=20) | weird_strings) + text[end:]
    in_folder({"r.yaml": text}, "r.yaml")


def test_the_real_recipes_load():
    for name in RECIPE_FILES:
        in_folder({}, name)


# --------------------------------------------------------------------------- overrides


def _override_values() -> st.SearchStrategy[str]:
    flow = json_values.map(
        lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    )
    return flow | st.text(max_size=40) | weird_strings


overrides = st.lists(
    st.text(max_size=60)
    | st.builds(
        lambda key, value: f"{key}={value}",
        st.sampled_from(KEYS) | st.text(max_size=20),
        _override_values(),
    ),
    max_size=3,
)


@given(st.sampled_from(sorted(RECIPE_FILES)), overrides)
@example("demo.yaml", ["x" * 5000])  # echoed whole: a 5000-character message
@example("demo.yaml", ["a\nb.c=1"])
@example("demo.yaml", ["train.seed=" + "[" * 5000])  # RecursionError
@example("demo.yaml", ["train.optimizer_args={a: !!binary aGk=}"])  # bytes: no JSON hash
@example("demo.yaml", ["train.optimizer_args={a: .nan}"])
@example("demo.yaml", ["train.seed.x=1"])  # never failed: a key below a value
def test_overrides(name, items):
    in_folder({}, name, items)


# --------------------------------------------------------------------------- extends


TARGETS = [
    "missing.yaml",
    "a-folder.yaml",
    ".",
    "",
    "/",
    "../",
    "1.1.yaml",
    "a" * 300,
    "a\x00b",
    "a\nb",
]


@st.composite
def extends_folders(draw) -> dict[str, str]:
    """Up to five files, each extending another one, itself, or something that is no recipe."""
    count = draw(st.integers(1, 5))
    names = [f"f{i}.yaml" for i in range(count)]
    files = {}
    for name in names:
        body: dict[str, Any] = {}
        if draw(st.booleans()):
            base = RECIPES["demo.yaml"]
            sections = draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True))
            body.update({section: base[section] for section in sections})
        target = draw(
            st.sampled_from(names)
            | st.sampled_from(TARGETS)
            | scalars
            | st.lists(scalars, max_size=2)
        )
        if draw(st.integers(0, 4)):
            body["extends"] = target
        files[name] = dump(body)
    return files


@given(extends_folders())
@example({"f0.yaml": "extends: " + "a" * 300 + "\n"})  # OSError: file name too long
@example({"f0.yaml": 'extends: "a\\nb"\n'})  # the name's newline broke the line
def test_extends(files):
    in_folder(files, "f0.yaml")


def chain(length: int) -> dict[str, str]:
    files = {f"c{i}.yaml": f"extends: c{i + 1}.yaml\n" for i in range(length - 1)}
    files[f"c{length - 1}.yaml"] = RECIPE_FILES["demo.yaml"]
    return files


def load_in_folder(files: dict[str, str], name: str) -> Recipe | MeebsError:
    with scratch() as tmp:
        for file_name, text in files.items():
            (Path(tmp) / file_name).write_text(text, encoding="utf-8")
        return result_or_one_line(load_recipe, Path(tmp) / name)


def test_a_chain_of_sixteen_files_loads_and_a_longer_one_is_one_line():
    assert isinstance(load_in_folder(chain(16), "c0.yaml"), Recipe)
    error = load_in_folder(chain(2000), "c0.yaml")  # was RecursionError
    assert isinstance(error, RecipeError) and "extend each other" in str(error)


def test_a_long_extends_loop_is_one_short_line():
    files = {
        f"{'l' * 200}{i}.yaml": f"extends: {'l' * 200}{(i + 1) % 15}.yaml\n" for i in range(15)
    }
    error = load_in_folder(files, f"{'l' * 200}0.yaml")
    assert isinstance(error, RecipeError) and "loops back on itself" in str(error)


# --------------------------------------------------------------------------- hostile YAML


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": `levels` anchors, each a list of `width` aliases of the last."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines)


def _flow_bomb(levels: int = 9, width: int = 9) -> str:
    """The same in one flow value: its last item expands to width ** levels strings."""
    items = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# Four lists 40 deep, each holding the one before: 160 levels once the aliases expand.
DEEP_ALIASES = (
    "["
    + ", ".join(f"&d{i} " + "[" * 40 + (f"*d{i - 1}" if i else "1") + "]" * 40 for i in range(4))
    + "]"
)
WORST_CASES: dict[str, tuple[str, list[str]]] = {
    "alias bomb": (_bomb(), []),
    "alias bomb as a value": (MINIMAL + f"train: {{seed: {_flow_bomb()}}}\n", []),
    "alias bomb in optimizer_args": (
        MINIMAL + f"train: {{optimizer_args: {{a: {_flow_bomb()}}}}}\n",
        [],
    ),
    "alias bomb as a key": (f"model: {{? {_flow_bomb()} : 1}}\n", []),
    "alias bomb in an override": (MINIMAL, [f"train.optimizer_args={{a: {_flow_bomb()}}}"]),
    "recursive alias": (MINIMAL + "train: {optimizer_args: &r {a: *r}}\n", []),
    "recursive merge": ("x: &r {<<: *r}\n", []),
    "aliases nested deep": (MINIMAL + f"train: {{optimizer_args: {{a: {DEEP_ALIASES}}}}}\n", []),
    "nested lists": ("[" * INPUT_BYTES, []),
    "nested block lists": ("- " * (INPUT_BYTES // 2), []),
    "nested mappings": ("a: {" * (INPUT_BYTES // 4), []),
    "a long line": ("a: " + "x" * INPUT_BYTES, []),
    "a long key": ("? " + "k" * INPUT_BYTES + "\n: 1\n", []),
    "many keys": ("".join(f"k{i}: {i}\n" for i in range(INPUT_BYTES // 10)), []),
    "many values": (MINIMAL + "sample: {prompts: [" + "a, " * (INPUT_BYTES // 3) + "]}\n", []),
    "a long integer": ("train: {seed: " + "9" * INPUT_BYTES + "}\n", []),
    "a long sexagesimal integer": ("train: {seed: 1" + ":00" * (INPUT_BYTES // 3) + "}\n", []),
    "a long hex integer": ("train: {seed: 0x" + "f" * INPUT_BYTES + "}\n", []),
    "a long float": (MINIMAL + "train: {learning_rate: 1" + "0" * INPUT_BYTES + ".0}\n", []),
    "python object": ('!!python/object/apply:os.system ["echo pwned"]\n', []),
    "python name": ("x: [!!python/name:os.system , !!python/module:os ]\n", []),
}


@pytest.mark.parametrize("case", sorted(WORST_CASES))
def test_worst_cases_stay_within_the_bound(case):
    """Each worst case is refused in one line (or loads), within BOUND_SECONDS and
    BOUND_BYTES of Python allocations."""
    text, items = WORST_CASES[case]
    assert len(text.encode()) <= 2 * INPUT_BYTES
    with scratch() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text, encoding="utf-8")
        result, seconds, peak = measured(lambda: load_and_use(path, items))
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f} s"
    assert peak < BOUND_BYTES, f"{case}: {peak / 2**20:.0f} MiB"
    if case.startswith("python"):
        assert isinstance(result, RecipeError) and "could not determine a constructor" in str(
            result
        )


def load_and_use(path: Path, items: list[str]) -> Recipe | MeebsError:
    """Load, and if that worked, hash and dump: where a bomb in a value went off."""
    result = result_or_one_line(load_recipe, path, items)
    if isinstance(result, Recipe):
        result.sha256()
        result.to_yaml()
    return result


def measured(call: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes allocated by Python while it ran): timed in one call,
    traced in a second one, since tracemalloc slows pure-Python parsing several times."""
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, seconds, peak
