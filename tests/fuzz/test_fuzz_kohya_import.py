"""Fuzzing `import-kohya` (issue 19): a kohya_ss GUI config (JSON) -> recipe YAML.

Property (fuzz/one_line.py): any file gives a conversion or a `MeebsError` of one line,
never another exception and never a hang. A conversion is also usable: every note is one
line, and the recipe text it prints is one that `load_recipe` accepts once the keys a
preset leaves empty (`Converted.fill_in`: the model, the image folder) are filled in.

Inputs: random bytes and text; random JSON values; the real configs in
tests/kohya_configs/ with keys dropped, retyped (the strings older GUIs wrote included),
or set to strange values (NaN, huge integers, -0, newlines, NUL, deep lists, objects where
strings belong), and random `optimizer_args` and `sample_prompts` strings.

Bound: a config of at most 64 KiB is converted within 5 s (every example's deadline; the
worst cases below, measured) and with at most 64 MiB of Python allocations at peak.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz.one_line import result_or_one_line
from fuzz.test_fuzz_recipe import (
    BOUND_BYTES,
    BOUND_SECONDS,
    INPUT_BYTES,
    check_usable,
    json_values,
    measured,
    scalars,
    scratch,
    weird_strings,
)
from meebs.errors import MeebsError
from meebs.interop.kohya_import import import_kohya
from meebs.interop.kohya_keys import Converted
from meebs.recipe.loading import load_recipe

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    path.name: json.loads(path.read_text(encoding="utf-8"))
    for path in sorted(REPO.glob("tests/kohya_configs/*.json"))
}
# the SD 1.x configs kohya_ss ships (kohya_configs/kohya_ss/README.md): presets, LyCORIS
# types, DreamBooth and textual-inversion configs
KOHYA_SS = {
    path.name: json.loads(path.read_text(encoding="utf-8"))
    for path in sorted(REPO.glob("tests/kohya_configs/kohya_ss/*.json"))
}
KEYS = sorted({key for config in (*CONFIGS.values(), *KOHYA_SS.values()) for key in config})
# What the user fills in where a preset left it empty.
FILLED = {"model.path": "models/sd15.safetensors", "data.train_dir": "data/img"}


def check_import(content: str | bytes) -> Converted | MeebsError:
    """Import `content` as a config file: a usable conversion, or one line."""
    with scratch() as tmp:
        path = Path(tmp) / "config.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        result = result_or_one_line(import_kohya, path)
        if isinstance(result, Converted):
            for note in result.notes:
                assert "\n" not in note and "\r" not in note, f"a note of several lines: {note!r}"
            recipe_file = Path(tmp) / "imported.yaml"
            recipe_file.write_text(result.text, encoding="utf-8")
            filled = [f"{key}={FILLED[key]}" for key in result.fill_in]
            check_usable(load_recipe(recipe_file, filled), Path(tmp))  # a usable recipe
        return result


def as_json(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


# --------------------------------------------------------------------------- random input


@given(st.binary(max_size=2000))
@example(b"\xef\xbb\xbf{}")
@example(b'{"a": "\xff"}')
def test_random_bytes(data):
    check_import(data)


@given(st.text(max_size=2000))
@example("[" * 100_000)  # RecursionError in Python's json
@example("1" * 5000)  # ValueError: more digits than Python converts
def test_random_text(text):
    check_import(text)


@given(json_values)
def test_random_json_values(value):
    check_import(as_json(value))


# --------------------------------------------------------------------------- real configs, mutated


@st.composite
def mutated_configs(draw, pool: dict[str, dict[str, Any]] = CONFIGS) -> dict[str, Any]:
    """A real config with one to four keys dropped, stringified or set to a strange value."""
    config = dict(pool[draw(st.sampled_from(sorted(pool)))])
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(KEYS) | st.text(max_size=12))
        action = draw(st.sampled_from(["drop", "string", "set", "set", "set"]))
        if action == "drop":
            config.pop(key, None)
        elif action == "string" and key in config:
            config[key] = str(config[key])  # as older GUIs wrote numbers and booleans
        else:
            config[key] = draw(json_values | weird_strings)
    return config


LOHA = CONFIGS["loha.json"]


@given(mutated_configs())
@example(LOHA | {"LoRA_type": []})  # unhashable: TypeError from `in LORA_TYPES`
@example(LOHA | {"save_precision": {}})  # ... and from `in SAVE_PRECISIONS`
@example(LOHA | {"LoRA_type": "x" * 5000})  # echoed whole: a 5000-character message
@example(LOHA | {"network_dim": ["\n"] * 2000})
@example(LOHA | {"learning_rate": float("nan")})  # a NaN learning rate was accepted
@example(LOHA | {"epoch": 1e100})  # 101 digits: printed, but load_yaml refuses to read it
@example(LOHA | {"output_name": "meeb\n"})  # `$` matched before the newline
@example(LOHA | {"training_comment": "\ud800"})  # a lone surrogate: no UTF-8 for the recipe
@example(LOHA | {"optimizer_args": "a={[]:1}"})  # TypeError from ast.literal_eval
@example(LOHA | {"optimizer_args": "a=" + "-" * 100_000 + "1"})  # MemoryError, ditto
@example(LOHA | {"optimizer_args": "a={1,2}"})  # a set: printed, it read back as {1: null, ...}
@example(LOHA | {"optimizer_args": "a=1j b=..."})
@example(LOHA | {"a\nb": 1})  # the note listing unconverted keys broke its line
@example(LOHA | {"noise_offset_type": "a\nb"})
def test_mutated_real_configs(config):
    check_import(as_json(config))


@given(mutated_configs(KOHYA_SS))
@example(KOHYA_SS["preset-sd15-LoKR-v1.0.json"] | {"factor": 1e99})  # a 100-digit factor
@example(KOHYA_SS["preset-sd15-LoKR-v1.0.json"] | {"network_dim": 1500, "factor": 2})
@example(KOHYA_SS["preset-loha-sd15.json"] | {"bucket_reso_steps": 10**99})
@example(KOHYA_SS["preset-loha-sd15.json"] | {"max_resolution": "-650,3"})
@example(KOHYA_SS["test-Diag-OFT-AdamW8bit-toml.json"] | {"constrain": "nan"})
@example(KOHYA_SS["preset-lion_optimizer.json"] | {"use_8bit_adam": []})
def test_mutated_kohya_ss_configs(config):
    check_import(as_json(config))


optimizer_arg_values = st.one_of(
    st.text(max_size=20),
    weird_strings,
    scalars.map(repr),
    json_values.map(repr),
)


@given(
    st.lists(
        st.builds(lambda name, value: f"{name}={value}", st.text(max_size=8), optimizer_arg_values),
        max_size=4,
    ).map(" ".join)
    | st.text(max_size=200)
)
def test_optimizer_args(text):
    check_import(as_json(LOHA | {"optimizer_args": text}))


@given(
    st.lists(
        st.text(max_size=40)
        | st.builds(
            lambda prompt, flag, value: f"{prompt} --{flag} {value}",
            st.text(max_size=20),
            st.sampled_from(["n", "w", "h", "d", "s", "l", "ss", "cn", "g", "W"])
            | st.text(max_size=3),
            st.text(max_size=12) | weird_strings | scalars.map(str),
        ),
        max_size=4,
    ).map("\n".join),
    st.none()
    | st.text(max_size=20)
    | st.sampled_from(["euler_a", "DPM++ 2M", "k_lms", "x" * 3000]),
)
def test_sample_prompts(prompts, sampler):
    check_import(as_json(LOHA | {"sample_prompts": prompts, "sample_sampler": sampler}))


def test_the_real_configs_import():
    for config in CONFIGS.values():
        assert isinstance(check_import(as_json(config)), Converted)


# --------------------------------------------------------------------------- the bound


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


WORST_CASES = {
    "nested lists": "[" * INPUT_BYTES,
    "nested objects": '{"a":' * (INPUT_BYTES // 5),
    "a long integer": "9" * INPUT_BYTES,
    "a long float": "1" + "0" * INPUT_BYTES + ".5",
    "many keys": as_json(LOHA | {f"k{i}": i for i in range(INPUT_BYTES // 12)}),
    "a long prompt": as_json(LOHA | {"sample_prompts": "<lora:" * (INPUT_BYTES // 6)}),
    "many prompts": as_json(LOHA | {"sample_prompts": "meeb --w 64\n" * (INPUT_BYTES // 12)}),
    "a long optimizer_args": as_json(LOHA | {"optimizer_args": "a=" + "(" * INPUT_BYTES}),
    "many optimizer_args": as_json(LOHA | {"optimizer_args": "a=1 " * (INPUT_BYTES // 4)}),
    "nested values": as_json(LOHA | {"network_dim": json.loads(_deep(60))}),
}


@pytest.mark.parametrize("case", sorted(WORST_CASES))
def test_worst_cases_stay_within_the_bound(case):
    text = WORST_CASES[case]
    assert len(text.encode()) <= 2 * INPUT_BYTES
    result, seconds, peak = measured(lambda: check_import(text))
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f} s"
    assert peak < BOUND_BYTES, f"{case}: {peak / 2**20:.0f} MiB"
    assert isinstance(result, (Converted, MeebsError))
