"""`make pretrain-tiny`, shortened: the same settings write the same bytes, the folder loads
as a base model, and the record says how it was made. The committed `tiny-trained` is
checked against its own record, pin and size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from meebs.models.builtin_models import TINY_TRAINED_SHA256
from meebs.models.loading import load_base_model
from meebs.tiny.pretrain_record import ASSET_DIR, CARD_NAME, RECORD_NAME, compare_with, file_hashes
from meebs.tiny.pretrain_tiny import PretrainConfig, main, pretrain

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

SHORT = PretrainConfig(
    vae_steps=3,
    scorer_steps=3,
    scorer_pool=32,
    scorer_round_trips=16,
    eval_per_kind=4,
    unet_steps=3,
    pool_size=32,
    unet_batch=4,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    for name in ("a", "b"):
        pretrain(SHORT, root / name, torch.device("cpu"), log=lambda line: None)
    return root / "a", root / "b"


def test_same_settings_same_bytes(two_runs, capsys):
    first, second = two_runs
    assert file_hashes(first) == file_hashes(second)
    assert compare_with(second, first)
    assert "same bytes" in capsys.readouterr().out


def test_a_changed_setting_is_named(two_runs, tmp_path, capsys):
    changed = tmp_path / "c"
    pretrain(
        PretrainConfig(**{**SHORT.__dict__, "seed": 7}), changed, torch.device("cpu"), log=print
    )
    assert not compare_with(changed, two_runs[0])
    out = capsys.readouterr().out
    assert "differs" in out and "config" in out


def test_the_folder_is_a_pinned_base_with_a_card(two_runs):
    folder = two_runs[0]
    record = json.loads((folder / RECORD_NAME).read_text())
    model = load_base_model(
        builtin=None, path=folder, sha256=record["folder_sha256"], allow_pickle=False
    )
    assert model.vae.config.scaling_factor == record_scale(folder)
    assert model.unet.config.sample_size == 16  # 64 px through a 4x VAE
    card = (folder / CARD_NAME).read_text()
    for fact in (record["folder_sha256"], record["generator_version"], "seed | 1126"):
        assert fact in card
    assert set(record["figures"]) >= {"vae_psnr_meeb", "scorer_shape_accuracy_vae"}
    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict) == {torch.float16}


def record_scale(folder: Path) -> float:
    return json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]


def test_unknown_setting_is_one_line(capsys):
    with pytest.raises(SystemExit, match="unknown key 'vae_stpes'"):
        main(["--set", "vae_stpes=3"])


def test_committed_tiny_trained_matches_its_record_and_pin():
    record = json.loads((ASSET_DIR / RECORD_NAME).read_text())
    assert file_hashes(ASSET_DIR) == record["files"]
    assert record["folder_sha256"] == TINY_TRAINED_SHA256
    model = load_base_model(builtin="tiny-trained", path=None, sha256=None, allow_pickle=False)
    assert model.source == "builtin:tiny-trained" and model.sha256 == record["folder_sha256"]
    weights = sum(path.stat().st_size for path in ASSET_DIR.rglob("*.safetensors"))
    assert weights <= 20 * 2**20
