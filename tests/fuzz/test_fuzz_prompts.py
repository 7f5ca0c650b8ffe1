"""Fuzzing the prompt parsers (issue 19): AUTOMATIC1111's `<lora:NAME:W>` / `<lyco:...>`
tags (`generate`), and kohya's sample prompt lines `prompt --n neg --w 64 --h 64 --d 5
--s 20 --l 7.5 --ss euler_a` (recipes, prompt files, kohya configs).

Property (fuzz/one_line.py): any prompt gives a result or a `MeebsError` of one line,
never another exception and never a hang. A result is usable: tag weights are finite,
the warnings are one line each, a sample prompt's size, steps, CFG and seed are ones the
pipeline takes (a seed torch.Generator accepts).

Bound: a prompt (or prompt file) of at most 64 KiB is parsed within 5 s (every example's
deadline; the worst cases below, measured) and with at most 64 MiB of Python
allocations at peak. Before the fix, 63 KB of "<a:" took 11 s: the tag pattern scanned
to the end of the prompt from every '<'.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz.one_line import result_or_one_line
from fuzz.test_fuzz_recipe import (
    BOUND_BYTES,
    BOUND_SECONDS,
    INPUT_BYTES,
    WEIRD_STRINGS,
    measured,
    scalars,
    scratch,
    weird_strings,
)
from meebs.models.sampling import (
    SamplePrompt,
    parse_kohya_prompt,
    read_prompt_file,
)
from meebs.use.prompt_tags import parse_prompt, weight_warnings

DEFAULTS = SamplePrompt(
    prompt="", negative="", width=64, height=64, seed=0, steps=20, cfg=7.0, sampler="Euler a"
)

# --------------------------------------------------------------------------- <lora:...> tags


def check_tags(prompt: str) -> None:
    result = result_or_one_line(parse_prompt, prompt)
    if isinstance(result, tuple):
        text, tags = result
        assert isinstance(text, str)
        for tag in tags:
            assert tag.name and math.isfinite(tag.te) and math.isfinite(tag.unet)
        for warning in weight_warnings(tags):
            assert "\n" not in warning and "\r" not in warning and len(warning) <= 1000


tag_items = st.one_of(
    st.text(max_size=10),
    st.sampled_from(WEIRD_STRINGS),
    scalars.map(str),
    st.builds(
        lambda key, value: f"{key}={value}",
        st.sampled_from(["te", "unet", "TE", " unet ", "dyn", ""]) | st.text(max_size=4),
        st.text(max_size=8) | scalars.map(str),
    ),
)
tags = st.builds(
    lambda kind, items: f"<{kind}:{':'.join(items)}>",
    st.sampled_from(["lora", "lyco", "LoRA", "hypernet", "a", "_"]) | st.text(max_size=6),
    st.lists(tag_items, max_size=5),
)
prompts = st.lists(
    tags | st.text(max_size=20) | st.sampled_from(["<", ">", ":", "<lora"]), max_size=8
).map("".join)


@given(st.text(max_size=1000))
@example("<lora:a\nb:1:x=1>")  # the tag, newline included, was echoed into the message
@example("<lora:x:" + "9" * 5000 + "e>")  # ... or 5000 characters of it
@example("<" + "x" * 3000 + ":1>")
def test_random_prompts(prompt):
    check_tags(prompt)


@given(prompts)
def test_prompts_of_tags(prompt):
    check_tags(prompt)


# --------------------------------------------------------------------------- kohya prompt lines


def check_line(line: str) -> None:
    result = result_or_one_line(parse_kohya_prompt, line, DEFAULTS)
    if isinstance(result, SamplePrompt):
        assert result.prompt and result.width % 8 == 0 and result.height % 8 == 0
        assert 1 <= result.steps <= 1000 and math.isfinite(result.cfg) and result.cfg >= 0
        assert 0 <= result.seed < 2**64  # what torch.Generator.manual_seed takes


FLAGS = ["n", "w", "h", "d", "s", "l", "ss", "W", "SS", "cn", "g", "x", "-", "w=", ""]
flag_values = st.one_of(
    st.text(max_size=12),
    weird_strings,
    scalars.map(str),
    st.sampled_from(["64", "512", " 64 ", "1_024", "６４", "20", "7.5", "euler_a", "DPM++ 2M"]),
)
lines = st.builds(
    lambda prompt, flags: prompt + "".join(f" --{flag} {value}" for flag, value in flags),
    st.text(max_size=20) | st.sampled_from(["meeb", "", " ", "a --", "--"]),
    st.lists(st.tuples(st.sampled_from(FLAGS) | st.text(max_size=3), flag_values), max_size=5),
)


@given(st.text(max_size=1000))
@example("meeb --x\n" + "x" * 3000)  # an unknown flag, echoed whole
@example("a\nb" * 2000 + " --w 1")
@example("meeb --d " + "9" * 30)  # a seed torch cannot take was accepted
@example(" --w 64 " + "x" * 3000)
@example("meeb --ss " + "x" * 3000)
def test_random_lines(line):
    check_line(line)


@given(lines)
def test_lines_of_flags(line):
    check_line(line)


@given(st.binary(max_size=2000))
# edge cases that never failed: Windows and Unicode line ends, a comment, not UTF-8
@example(b"meeb --w 64\r\nperson --h 64\x85x --s 3\n# comment\n")
@example(b"\xff --w 64")
def test_prompt_files(data):
    """A prompt file, read as `sample.prompt_file` is, then every line as a prompt."""
    with scratch() as tmp:
        path = Path(tmp) / "prompts.txt"
        path.write_bytes(data)
        result = result_or_one_line(read_prompt_file, path)
    if isinstance(result, list):
        for line in result:
            check_line(line)


# --------------------------------------------------------------------------- the bound


WORST_TAGS = {
    "'<a:' repeated": "<a:" * (INPUT_BYTES // 3),
    "'<lora:' repeated": "<lora:" * (INPUT_BYTES // 6) + "x",
    "'<' repeated": "<" * INPUT_BYTES,
    "'<a:' repeated, then '>'": "<a:" * (INPUT_BYTES // 3) + ">",
    "a tag of colons": "<lora:a:" + ":" * INPUT_BYTES + ">",
    "a tag of te=": "<lora:a:" + "te=1:" * (INPUT_BYTES // 5) + ">",
    "many tags": "<lora:a:1>" * (INPUT_BYTES // 10),
    "a long word": "<" + "a" * INPUT_BYTES,
    "spaces after '<'": "< " * (INPUT_BYTES // 2),
}
WORST_LINES = {
    "many flags": "meeb" + " --w 64" * (INPUT_BYTES // 7),
    "'--' repeated": "a" + " --" * (INPUT_BYTES // 3),
    "a long prompt": "a" * INPUT_BYTES + " --w 64",
    "a long number": "meeb --w " + "6" * 4000,
    "a long negative": "meeb --n " + "bad, " * (INPUT_BYTES // 5),
}


@pytest.mark.parametrize("case", sorted(WORST_TAGS))
def test_worst_tags_stay_within_the_bound(case):
    _, seconds, peak = measured(lambda: check_tags(WORST_TAGS[case]))
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f} s"
    assert peak < BOUND_BYTES, f"{case}: {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("case", sorted(WORST_LINES))
def test_worst_lines_stay_within_the_bound(case):
    _, seconds, peak = measured(lambda: check_line(WORST_LINES[case]))
    assert seconds < BOUND_SECONDS, f"{case}: {seconds:.1f} s"
    assert peak < BOUND_BYTES, f"{case}: {peak / 2**20:.0f} MiB"


def test_a_prompt_of_64_kib_is_parsed_in_linear_time():
    """The quadratic case in full size, whatever the profile: it took 11 s."""
    prompt = "<a:" * (64 * 2**10 // 3)
    _, seconds, _ = measured(lambda: check_tags(prompt))
    assert seconds < 1.0, f"{seconds:.1f} s"
