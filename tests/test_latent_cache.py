"""The disk latent cache: reused across runs, invalidated by content, never trusted blindly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from meebs.data import latents as latent_io
from meebs.files.safetensors_io import file_sha256
from meebs.recipe.loading import load_recipe
from meebs.training.train import train

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
ONE_EPOCH = [
    "model.builtin=tiny",  # cache mechanics, not learning: the random base
    "train.epochs=1",
    "train.batch_size=4",
    "sample.every_n_epochs=0",
    "validation.enabled=false",  # its image would count as one more encode
]


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A private copy of the demo data and a private cache folder.

    The copy repeats each image once (`1_meeb`, not `10_meeb`): the same 12 images to
    cache, 3 steps an epoch instead of 30, as the cache does not care how often an image
    is drawn.
    """
    monkeypatch.setenv("MEEBS_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(REPO / "data" / "demo", tmp_path / "data")
    (tmp_path / "data" / "train" / "10_meeb").rename(tmp_path / "data" / "train" / "1_meeb")
    return tmp_path / "data"


@pytest.fixture
def encodes(monkeypatch) -> list[int]:
    """Counts the images the VAE encodes."""
    calls: list[int] = []
    original = latent_io.encode

    def counting(vae, pixels, generator):
        calls.append(len(pixels))
        return original(vae, pixels, generator)

    monkeypatch.setattr(latent_io, "encode", counting)
    return calls


def run(data: Path, out: Path, *overrides: str):
    recipe = load_recipe(
        REPO / "recipes" / "demo.yaml",
        [
            *ONE_EPOCH,
            f"data.train_dir={data / 'train'}",
            f"data.reg_dir={data / 'reg'}",
            f"output.dir={out}",
            *overrides,
        ],
    )
    return train(recipe, Console(quiet=True))


@pytest.mark.parametrize("base", ["tiny", "tiny-trained"])  # 8x and 4x smaller latents
def test_a_second_run_encodes_nothing_and_gives_the_same_bytes(data, encodes, tmp_path, base):
    first = run(data, tmp_path / "a", f"model.builtin={base}")
    assert sum(encodes) == 12  # 6 training + 6 reg images, no flips
    encodes.clear()
    second = run(data, tmp_path / "b", f"model.builtin={base}")
    assert encodes == []
    assert [file_sha256(f) for f in first.files] == [file_sha256(f) for f in second.files]


def test_a_changed_image_alone_is_encoded_again(data, encodes, tmp_path):
    run(data, tmp_path / "a")
    victim = sorted((data / "train").rglob("*.png"))[1]
    Image.open(victim).rotate(90).save(victim)
    encodes.clear()
    run(data, tmp_path / "b")
    assert sum(encodes) == 1


def test_a_corrupt_entry_is_encoded_again_not_trained_on(data, encodes, tmp_path):
    first = run(data, tmp_path / "a")
    store = latent_io.latent_store()
    entries = sorted(store.rglob("*.safetensors"))
    assert len(entries) == 12
    entries[0].write_bytes(entries[0].read_bytes()[:-8])  # truncated
    entries[1].write_bytes(entries[0].read_bytes()[:16])  # garbage
    encodes.clear()
    recipe_run = run(data, tmp_path / "b")
    assert sum(encodes) == 2
    assert [file_sha256(f) for f in first.files] == [file_sha256(f) for f in recipe_run.files]


def test_cache_in_memory_only_writes_nothing(data, encodes, tmp_path):
    run(data, tmp_path / "a", "data.cache_latents_to_disk=false")
    assert not latent_io.latent_store().exists()
    encodes.clear()
    run(data, tmp_path / "b", "data.cache_latents_to_disk=false")
    assert sum(encodes) == 12
