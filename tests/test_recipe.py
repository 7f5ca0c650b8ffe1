"""Recipe loading: every class of error stops with one line naming file, key and fix."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from meebs.errors import RecipeError
from meebs.recipe.keys import documented_keys
from meebs.recipe.loading import load_recipe
from meebs.recipe.schema import Recipe

REPO = Path(__file__).resolve().parent.parent
MINIMAL = """\
model: {builtin: tiny}
data: {train_dir: data/demo/train, resolution: 64}
output: {name: demo}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    return message


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.data.resolution == [64, 64]  # one number means a square
    assert recipe.network.algo == "loha" and recipe.network.dim == 4
    assert recipe.unet_lr == recipe.train.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("train: {epoch: 3}", "r.yaml: train.epoch: unknown key; did you mean train.epochs?"),
        ("trian: {epochs: 3}", "r.yaml: trian: unknown key; did you mean train?"),
        ("train: {epochs: three}", "r.yaml: train.epochs: expected an integer, got 'three'"),
        ("train: {epochs: 2.5}", "r.yaml: train.epochs: expected an integer, got 2.5"),
        ("train: {epochs: 0}", "r.yaml: train.epochs: 0 is out of range: must be >= 1"),
        ("train: {epochs: true}", "r.yaml: train.epochs: expected an integer, got True"),
        (
            "data: {caption_dropout_rate: 1.5}",
            "data.caption_dropout_rate: 1.5 is out of range: must be between 0.0 and 1.0",
        ),
        ("network: {algo: boft}", "network.algo: expected one of 'loha', 'locon', 'lora', 'lokr'"),
        ("train: {max_token_length: 100}", "expected one of 75, 150, 225, got 100"),
        (
            "train: {lr_scheduler: constant, lr_warmup: 0.1}",
            "train.lr_warmup: the constant scheduler has no warmup",
        ),
        ("train: {unet_lr: 0, text_encoder_lr: 0}", "nothing would be trained"),
        ("network: {conv_dim: 0, use_tucker: true}", "network.use_tucker"),
        ("sample: {every_n_epochs: 1}", "set sample.prompts or sample.prompt_file"),
        ("model: {path: x.safetensors}", "set exactly one of model.builtin"),
        ("model: {sha256: abc}", "model.sha256: expected 64 lowercase hex digits"),
        ("data: {resolution: [64, 60]}", "data.resolution: 60: sides must be multiples of 8"),
        ("output: {name: 'my run'}", "output.name: required; up to 200 letters, digits"),
    ],
)
def test_each_error_names_file_key_and_rule(tmp_path, extra, expected):
    base, more = yaml.safe_load(MINIMAL), yaml.safe_load(extra)
    for section, values in more.items():
        base.setdefault(section, {}).update(values)
    assert expected in error_of(write(tmp_path, yaml.safe_dump(base)))


def test_missing_file_and_bad_yaml(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")
    message = error_of(write(tmp_path, "model:\n  builtin: tiny\n bad: [\n"))
    assert message.startswith(f"{tmp_path / 'r.yaml'}: line ")


def test_extends_inherits_and_overrides(tmp_path):
    write(tmp_path, MINIMAL + "train: {epochs: 5, batch_size: 2}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\ntrain: {epochs: 7}\n", "child.yaml")
    recipe = load_recipe(child)
    assert recipe.train.epochs == 7  # overridden
    assert recipe.train.batch_size == 2  # inherited from the same section
    assert recipe.output.name == "demo"  # inherited section


def test_command_line_overrides_apply_last_and_are_named(tmp_path):
    path = write(tmp_path, MINIMAL + "train: {epochs: 5}\n")
    recipe = load_recipe(path, ["train.epochs=3", "train.seed=7", "data.resolution=[128, 64]"])
    assert (recipe.train.epochs, recipe.train.seed) == (3, 7)
    assert recipe.data.resolution == [128, 64]
    assert error_of(path, ["train.epoch=3"]).startswith("command line: train.epoch: unknown key")
    assert error_of(path, ["train.epochs=x"]).startswith("command line: train.epochs:")
    assert "looks like section.key=value" in error_of(path, ["epochs"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trian.seed=1", "command line: trian: unknown key; did you mean train?"),
        ("train.sede=1", "command line: train.sede: unknown key; did you mean train.seed?"),
        ("train.seed=x", "command line: train.seed: expected an integer, got 'x'"),
        ("train.seed=-1", "command line: train.seed: -1 is out of range"),
        ("train.seed.x=1", "command line: train.seed: expected an integer, got {'x': 1}"),
        ("train.seed", "command line: 'train.seed': an override looks like section.key=value"),
        ("train.seed=[1", "command line: train.seed: cannot read the value"),
        ("data.resolution=60", "command line: data.resolution: 60: sides must be multiples"),
        ("model.path=x.safetensors", "command line: model: set exactly one of model.builtin"),
        ("train.lr_warmup=0.1", "command line: train.lr_warmup: the constant scheduler"),
    ],
)
def test_every_override_error_is_blamed_on_the_command_line(tmp_path, override, expected):
    assert error_of(write(tmp_path, MINIMAL), [override]).startswith(expected)


def test_not_utf8_recipe_names_file_line_and_fix(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(MINIMAL.encode() + "# café\n".encode("latin-1"))
    offset = len(MINIMAL.encode()) + len("# caf")
    assert error_of(path) == (
        f"recipe {path} is not UTF-8 text (byte 0xe9 at line 4, offset {offset}): save it as UTF-8"
    )
    child = write(tmp_path, "extends: r.yaml\n", "child.yaml")
    assert error_of(child).startswith(f"recipe {path} is not UTF-8 text")


def test_a_leading_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_recipe(path).output.name == "demo"


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("train:\n  seed: 1\n  seed: 2\n", "train.seed", (2, 3)),
        ("train: {seed: 1}\nsample: {}\ntrain: {epochs: 2}\n", "train", (1, 3)),
        ("train: {seed: 1, seed: 2}\n", "train.seed", (1, 1)),
        ("sample:\n  prompts: [a]\n  prompts: [b]\n", "sample.prompts", (2, 3)),
    ],
)
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, text, key, lines):
    path = write(tmp_path, MINIMAL + text)
    first, second = (line + len(MINIMAL.splitlines()) for line in lines)
    assert error_of(path) == (
        f"{path}: {key} is given twice (lines {first} and {second}); keep one of them"
    )


def test_a_key_given_twice_in_an_extended_recipe_is_an_error(tmp_path):
    write(tmp_path, MINIMAL + "output: {name: other}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\ntrain: {epochs: 7}\n", "child.yaml")
    assert error_of(child) == (
        f"{tmp_path / 'base.yaml'}: output is given twice (lines 3 and 4); keep one of them"
    )


def test_merge_keys_may_override_what_they_merge(tmp_path):
    text = MINIMAL + "x-base: &base {seed: 1, epochs: 2}\ntrain: {<<: *base, seed: 3}\n"
    raw = yaml.safe_load(text)
    assert raw["train"] == {"seed": 3, "epochs": 2}
    assert "x-base: unknown key" in error_of(write(tmp_path, text))  # not "given twice"


def test_extends_loop_is_an_error(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    assert "extends loops back on itself" in error_of(tmp_path / "a.yaml")


def test_extends_of_a_missing_file_names_the_recipe_that_extends_it(tmp_path):
    child = write(tmp_path, "extends: nope.yaml\n", "child.yaml")
    message = error_of(child)
    assert message.startswith(f"{child}: extends: nope.yaml: no such recipe next to it")


def test_hash_is_canonical(tmp_path):
    a = load_recipe(write(tmp_path, MINIMAL))
    b = load_recipe(write(tmp_path, MINIMAL.replace("resolution: 64", "resolution: [64, 64]"), "b"))
    c = load_recipe(write(tmp_path, MINIMAL), ["train.seed=1"])
    assert a.sha256() == b.sha256()
    assert a.sha256() != c.sha256()


def test_learning_rate_written_as_1e_4_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; users write it that way all the time
    recipe = load_recipe(write(tmp_path, MINIMAL + "train: {learning_rate: 1e-4}\n"))
    assert recipe.train.learning_rate == pytest.approx(1e-4)


def test_every_key_is_documented():
    rows = documented_keys()
    assert all(doc for _, _, _, doc in rows)
    keys = {key for key, *_ in rows}
    assert {"train.epochs", "network.conv_alpha", "sample.sampler", "model.sha256"} <= keys
    sections = [getattr(Recipe(), f.name) for f in dataclasses.fields(Recipe)]
    assert len(keys) == len(rows) == sum(len(dataclasses.fields(s)) for s in sections)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    assert isinstance(load_recipe(path), Recipe)


def test_yaml_bare_no_means_the_string_no(tmp_path):
    # `mixed_precision: no` is what kohya users write; YAML 1.1 reads it as false
    recipe = load_recipe(write(tmp_path, MINIMAL + "train: {mixed_precision: no}\n"))
    assert recipe.train.mixed_precision == "no"
    assert (
        load_recipe(write(tmp_path, MINIMAL), ["train.mixed_precision=no"]).train.mixed_precision
        == "no"
    )
