"""The command line: one-line errors with exit status 2, the plan; the docs: keys table, links."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meebs.cli import main
from meebs.recipe.keys import keys_markdown

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "recipes" / "demo.yaml")


def test_bad_override_is_one_line_and_status_2(capsys):
    assert main(["plan", DEMO, "train.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: command line: train.epoch: unknown key; did you mean train.epochs?"


def test_bad_data_folder_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "meeb").mkdir()
    assert main(["plan", DEMO, f"data.train_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "meeb" in err and "\n" not in err
    assert "Traceback" not in err


def test_plan_prints_steps_and_file_names(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["plan", DEMO, "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "meebs_demo-000001.safetensors" in out and "meebs_demo.safetensors" in out
    assert "total steps" in out and "120" in out  # 60 steps per epoch x 2


def test_docs_list_every_recipe_key():
    page = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert keys_markdown() in page, "run: python entrypoint.py keys --markdown"


README_MAX_BYTES = 10_000
# `](target)` or `](target "title")`: the target of a Markdown link or image.
LINK = re.compile(r'\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def test_readme_is_one_page():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move detail into docs/"


def test_relative_links_point_to_files():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # http(s), mailto: or an anchor on the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


LATIN_1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


def not_utf8_inputs(tmp_path: Path) -> dict[str, tuple[list[str], Path]]:
    """Each text file the CLI reads, saved as Latin-1: (command line, the file)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: {builtin: tiny}\n# " + LATIN_1 + b"\noutput: {name: x}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: r.yaml\n", encoding="utf-8")
    kohya = tmp_path / "kohya.json"
    kohya.write_bytes(b'{"LoRA_type": "' + LATIN_1 + b'"}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_bytes(b'{"kind": "' + LATIN_1 + b'"}')
    folder = tmp_path / "train" / "1_meeb"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes((REPO / "data/demo/train/10_meeb/meeb_003.png").read_bytes())
    (folder / "0.txt").write_bytes(LATIN_1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(LATIN_1 + b"\n")
    pins = tmp_path / "pins.yaml"
    pins.write_bytes(b"sd15: # " + LATIN_1 + b"\n")
    drop = tmp_path / "drop.yaml"
    drop.write_bytes(b'drop:\n  "10_meeb/meeb_003.png": "' + LATIN_1 + b'"\n')
    return {
        "recipe": (["plan", str(recipe)], recipe),
        "extended recipe": (["plan", str(child)], recipe),
        "kohya config": (["import-kohya", str(kohya)], kohya),
        "manifest": (["reproduce", str(run)], run / "manifest.json"),
        "caption": (["plan", DEMO, f"data.train_dir={folder.parent}"], folder / "0.txt"),
        "prompt file": (["plan", DEMO, f"sample.prompt_file={prompts}"], prompts),
        "pins": (["fetch-model", "sd15", "--pins", str(pins), "--dest", str(tmp_path)], pins),
        "drop list": (
            ["prep", "data/demo/train", "--to", str(tmp_path / "new"), "--drop", str(drop)],
            drop,
        ),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "recipe",
        "extended recipe",
        "kohya config",
        "manifest",
        "caption",
        "prompt file",
        "pins",
        "drop list",
    ],
)
def test_a_text_file_that_is_not_utf8_is_one_line_naming_it(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv, path = not_utf8_inputs(tmp_path)[kind]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"{path} is not UTF-8 text (byte 0xe9 at line " in err
    assert err.endswith("save it as UTF-8")


def test_duplicate_key_in_a_recipe_is_one_line_naming_both_lines(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  seed: 1\n  epochs: 2\n  seed: 3\n", encoding="utf-8")
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {recipe}: train.seed is given twice (lines 2 and 4); keep one of them")


def test_unknown_section_on_the_command_line_is_blamed_on_it(capsys):
    assert main(["plan", DEMO, "trian.seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: command line: trian: unknown key; did you mean train?"


def test_paths_are_never_wrapped_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """CI, `docker compose run` and log files get no terminal: rich used to wrap at 80
    columns there, cutting the paths a user copies in two."""
    monkeypatch.chdir(REPO)
    deep = tmp_path / ("a" * 60) / ("b" * 60)
    assert main(["plan", DEMO, f"output.dir={deep}"]) == 0
    out = capsys.readouterr().out
    assert f"dir: {deep}\n" in out


def test_make_names_an_unknown_recipe_before_it_looks_for_docker(tmp_path):
    """Whatever the machine has (here no docker on PATH), `make train RECIPE=nope` says
    first that the recipe does not exist, and which ones do."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    path = tmp_path / "bin"
    path.mkdir()
    (path / "make").symlink_to(make)
    recipes = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    for goal, extra in (
        ("train", []),
        ("train", ["LOCAL=1"]),
        ("plan", []),
        ("reproduce", []),
        ("train", ["-n"]),
    ):
        done = subprocess.run(
            [make, "--no-print-directory", goal, "RECIPE=nope", *extra],
            cwd=REPO,
            env={"PATH": str(path), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        first = (done.stdout + done.stderr).strip().splitlines()[0]
        assert "unknown recipe 'nope'" in first, (goal, extra, first)
        available = first.split("available: ")[1].removesuffix(".  Stop.").split()
        assert sorted(available) == recipes
