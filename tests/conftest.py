"""Shared fixtures: the full-size SD 1.5 parts, built once per session, and a private
cache folder so tests never write the user's ~/.cache/sd-meebs.

torch, diffusers and transformers are imported inside the fixture, so test runs that do
not use it do not pay for those imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

SHARED_RUNS = {"short_demo", "short_demo_seed7"}


def pytest_collection_modifyitems(items):
    """A test that reads a shared training run is slow (it may be the one that trains it)."""
    for item in items:
        if SHARED_RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Verified-hash cache (meebs.files.hash_cache) in a temp folder for the whole session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEEBS_CACHE_DIR", str(tmp_path_factory.mktemp("meebs-cache")))
    yield
    patch.undo()


if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

# REFERENCE.md section 7.
SD15_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "sample_size": 64,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD15_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


@pytest.fixture(scope="session")
def sd15_random_parts() -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """(UNet, text encoder) with SD 1.5's exact architecture and random weights, frozen.

    The text encoder (123M parameters) gets its normal init. The UNet (860M) would take
    3.4 GB and ~10 s to initialise on two cores, so it is built on the meta device and
    every parameter becomes a read-only view of one shared seeded random block (120 MB,
    well under a second). Good for names, shapes and forward passes; never write to its
    weights, and do not rely on weight statistics.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    shapes = {name: parameter.shape for name, parameter in unet.named_parameters()}
    block = torch.empty(max(shape.numel() for shape in shapes.values()))
    block.uniform_(-0.02, 0.02, generator=torch.Generator().manual_seed(0))
    unet.load_state_dict(
        {name: block[: shape.numel()].view(shape) for name, shape in shapes.items()}, assign=True
    )
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def _shared_run(tmp_path_factory, name: str, *overrides: str):
    """Train one short demo run for the session; fail if a test changed any of its files."""
    from engine_runs import snapshot, train_demo

    from meebs.cli import main

    run = train_demo(main, tmp_path_factory.mktemp(name), *overrides)
    before = snapshot(run.outputs)
    yield run
    assert snapshot(run.outputs) == before, f"a test wrote into the shared run {run.run_dir}"


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory):
    """The demo recipe, 2 epochs at batch 4 on the tiny base (engine_runs.SHORT_RUN):
    two network files, two samples per epoch, validation, TensorBoard logs. Read only."""
    yield from _shared_run(tmp_path_factory, "short-demo")


@pytest.fixture(scope="session")
def short_demo_seed7(tmp_path_factory):
    """`short_demo` with another seed and no samples: differs in weights and recipe. Read only."""
    yield from _shared_run(
        tmp_path_factory, "short-demo-seed7", "train.seed=7", "sample.every_n_epochs=0"
    )
