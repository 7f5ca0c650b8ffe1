"""Fuzzing the run manifest reader (issue 19): `manifest.json` as `reproduce` and `record`
read it, up to the point where `reproduce` would start training.

Property (fuzz/one_line.py): any manifest gives the recipe to rerun (and `record` files
the manifest inside the results folder) or a `MeebsError` of one line, never another
exception and never a hang.

Inputs: random bytes, text and JSON values; the manifest committed in results/demo/
with keys dropped, retyped or set to strange values, at the top, in `recipe_source`,
`data`, `outputs` and inside the recorded recipe; and random overrides on the command line.

Bound: a manifest of at most 64 KiB is read within 5 s (every example's deadline; the
worst cases below, measured) and with at most 64 MiB of Python allocations at peak.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from rich.console import Console

from fuzz.one_line import result_or_one_line
from fuzz.test_fuzz_recipe import (
    BOUND_BYTES,
    BOUND_SECONDS,
    INPUT_BYTES,
    check_usable,
    json_values,
    measured,
    overrides,
    scratch,
    weird_strings,
)
from meebs.errors import MeebsError
from meebs.recipe.schema import Recipe
from meebs.repro.reproduce import load_reference, recipe_for_rerun, record

REPO = Path(__file__).resolve().parents[2]
VALID: dict[str, Any] = json.loads(
    next(REPO.glob("results/demo/*.json")).read_text(encoding="utf-8")
)
VALID["recipe_source"] = {"file": None, "overrides": []}  # the file is checked on its own below
TOP_KEYS = sorted(VALID)
RECIPE_KEYS = [(section, key) for section in VALID["recipe"] for key in VALID["recipe"][section]]


def reproduce_until_training(run: Path, items: list[str]) -> Recipe:
    """What `reproduce RUN items` does before it trains."""
    recipe, _ = recipe_for_rerun(load_reference(run), items)
    return recipe


def record_into(run: Path, results: Path) -> Path:
    """`record RUN`: the manifest is filed inside the results folder."""
    target = record(run, results, replace=False, console=Console(file=io.StringIO()))
    assert target.resolve().is_relative_to(results.resolve()), target
    return target


def check_manifest(content: str | bytes, items: list[str] | tuple[str, ...] = ()) -> Any:
    with scratch() as tmp:
        folder = Path(tmp)
        (folder / "run").mkdir()
        path = folder / "run" / "manifest.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        result = result_or_one_line(reproduce_until_training, folder / "run", list(items))
        if isinstance(result, Recipe):
            check_usable(result, folder)
        result_or_one_line(record_into, folder / "run", folder / "results")
        return result


def as_json(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def with_changes(*changes: tuple[tuple[Any, ...], Any]) -> dict[str, Any]:
    """VALID with the value at each key path replaced (`DROP`: removed); a change below
    one that removed or replaced its parent is skipped."""
    manifest = copy.deepcopy(VALID)
    for path, value in changes:
        node: Any = manifest
        for key in path[:-1]:
            in_dict = isinstance(node, dict) and key in node
            in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
            node = node[key] if in_dict or in_list else None
        if isinstance(node, dict) and value is DROP:
            node.pop(path[-1], None)
        elif isinstance(node, dict):
            node[path[-1]] = value
    return manifest


DROP = object()


def test_the_committed_manifest_reproduces():
    assert isinstance(check_manifest(as_json(VALID)), Recipe)


# --------------------------------------------------------------------------- random input


@given(st.binary(max_size=2000))
@example(b"\xef\xbb\xbf{}")
def test_random_bytes(data):
    check_manifest(data)


@given(st.text(max_size=2000))
@example("[" * 100_000)  # RecursionError in Python's json
@example('{"format": ' + "1" * 5000 + "}")  # ValueError: too many digits for int()
def test_random_text(text):
    check_manifest(text)


@given(json_values)
def test_random_json_values(value):
    check_manifest(as_json(value))


@given(
    st.dictionaries(
        st.sampled_from(TOP_KEYS) | st.text(max_size=8), json_values, max_size=len(TOP_KEYS)
    )
)
def test_random_objects_with_the_manifest_keys(value):
    check_manifest(as_json({"kind": VALID["kind"], "format": 1} | value))


# ------------------------------------------------------------------ the real manifest, mutated


@st.composite
def mutated_manifests(draw) -> dict[str, Any]:
    """The committed manifest with one to three values dropped or replaced."""
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "source", "recipe", "data", "outputs"]))
        if where == "top":
            path: tuple[str, ...] = (draw(st.sampled_from(TOP_KEYS)),)
        elif where == "source":
            path = ("recipe_source", draw(st.sampled_from(["file", "overrides", "x"])))
        elif where == "recipe":
            path = ("recipe", *draw(st.sampled_from(RECIPE_KEYS)))
        elif where == "data":
            path = (
                "data",
                "files",
                0,
                draw(st.sampled_from(["path", "sha256", "caption", "repeats"])),
            )
        else:
            path = ("outputs", draw(st.text(max_size=12) | st.sampled_from(["../x", "a/b", ".."])))
        value = draw(st.just(DROP) | json_values | weird_strings)
        changes.append((path, value))
    return with_changes(*changes)


@given(mutated_manifests())
@example(with_changes((("recipe_source",), DROP)))  # KeyError in recipe_for_rerun
@example(with_changes((("recipe_source",), [])))  # TypeError
@example(with_changes((("recipe_source", "overrides"), 7)))
@example(with_changes((("status",), "finished\nor not")))  # the status broke the line
@example(with_changes((("status",), "failed"), (("failure",), "x" * 5000)))  # 5000 characters
@example(with_changes((("format",), "1" * 3000)))  # the format, echoed whole
@example(with_changes((("format",), True)))  # never failed; refused now: no format
@example(with_changes((("hardware_class",), "../../escaped")))  # `record` wrote outside
@example(with_changes((("hardware_class",), "x" * 2000)))  # record: OSError, name too long
@example(with_changes((("recipe",), 7)))  # record: TypeError
@example(with_changes((("recipe", "output", "name"), DROP)))  # record: KeyError
@example(with_changes((("recipe_source", "file"), "a" * 5000)))  # OSError: name too long
@example(with_changes((("recipe_source", "file"), ["x"])))
@example(with_changes((("recipe_source", "file"), "\x00")))  # record: mkdir's ValueError
@example(with_changes((("recipe", "train", "learning_rate"), float("nan"))))
def test_mutated_real_manifest(manifest):
    check_manifest(as_json(manifest))


@given(overrides)
@example(["train.seed=9223372036854775808"])
def test_overrides_on_the_command_line(items):
    check_manifest(as_json(VALID), items)


@given(st.sampled_from(sorted(p.name for p in REPO.glob("recipes/*.yaml"))), st.data())
def test_the_recorded_recipe_file(name, data):
    """`reproduce` compares the recorded recipe with its file, when the file still exists."""
    with scratch() as tmp:
        recipe_file = Path(tmp) / name
        text = (REPO / "recipes" / name).read_text(encoding="utf-8")
        recipe_file.write_text(text + data.draw(st.text(max_size=40)), encoding="utf-8")
        file = data.draw(st.sampled_from([str(recipe_file), tmp, "", "a" * 5000, "x\n"]))
        source = {"file": file, "overrides": data.draw(overrides)}
        check_manifest(as_json(with_changes((("recipe_source",), source))))


def test_recorded_overrides_that_are_no_text():
    """The recorded overrides are applied to the recipe file when it still exists: a
    number among them raised AttributeError (int.partition)."""
    with scratch() as tmp:
        recipe_file = Path(tmp) / "demo.yaml"
        recipe_file.write_text((REPO / "recipes/demo.yaml").read_text("utf-8"), "utf-8")
        source = {"file": str(recipe_file), "overrides": [7]}
        error = check_manifest(as_json(with_changes((("recipe_source",), source))))
    assert isinstance(error, MeebsError), error


def test_a_changed_recipe_file_is_named_in_one_short_line():
    """Many keys changed, one by a long list: the message names a few, each cut short
    (it listed every change in full)."""
    with scratch() as tmp:
        recipe_file = Path(tmp) / "demo.yaml"
        recipe_file.write_text((REPO / "recipes/demo.yaml").read_text("utf-8"), "utf-8")
        changes = ["train.seed=7", "train.epochs=9", "network.dim=8", "network.alpha=3"]
        changes += ["train.batch_size=3", "sample.prompts=[" + "meeb, " * 300 + "x]"]
        source = {"file": str(recipe_file), "overrides": changes}
        error = check_manifest(as_json(with_changes((("recipe_source",), source))))
    assert isinstance(error, MeebsError) and "changed since run" in str(error), error
    assert "and 1 more" in str(error)


# --------------------------------------------------------------------------- the bound


WORST_CASES = {
    "nested lists": "[" * INPUT_BYTES,
    "a long integer": '{"format": ' + "9" * INPUT_BYTES + "}",
    "many data files": as_json(
        with_changes(
            (
                ("data", "files"),
                [VALID["data"]["files"][0]]
                * (INPUT_BYTES // len(as_json(VALID["data"]["files"][0]))),
            )
        )
    ),
    "many packages": as_json(
        with_changes((("packages",), {f"p{i}": "1.0" for i in range(INPUT_BYTES // 14)}))
    ),
    "a nested recipe": as_json(
        with_changes((("recipe", "train", "optimizer_args"), {"a": [[[[[[[[1]]]]]]]]}))
    ),
}


@pytest.mark.parametrize("case", sorted(WORST_CASES))
def test_worst_cases_stay_within_the_bound(case):
    text = WORST_CASES[case]
    assert len(text.encode()) <= 2 * INPUT_BYTES + len(as_json(VALID))
    result, seconds, peak = measured(lambda: check_manifest(text))
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f} s"
    assert peak < BOUND_BYTES, f"{case}: {peak / 2**20:.0f} MiB"
    assert isinstance(result, (Recipe, MeebsError))
