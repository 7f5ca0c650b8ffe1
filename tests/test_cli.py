"""The command line: one-line errors with exit status 2, the plan, the README's key table."""

from pathlib import Path

from meebs.cli import main
from meebs.recipe import keys_markdown

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


def test_readme_lists_every_recipe_key():
    readme = (REPO / "README.md").read_text()
    assert keys_markdown() in readme, "run: python entrypoint.py keys --markdown"
