"""How big each network file will be, known before training starts.

Version 1.3 of the original project exists because 1.1's files were ~100 MB: the rank
decides the file size, and a user should see that size in `plan`, not after a GPU-day.

The estimate is exact rather than a rule of thumb: the network is created by the same
code the trainer uses (`meebs.network.build_network`), but on a base model whose weights
are never allocated (accelerate's `init_empty_weights`: the modules have shapes only), so
the tensor names and shapes are the real ones and the full SD 1.5 costs well under a
second. The file is then sized like `meebs.safetensors_io` writes it: tensor bytes in the
save precision plus the canonical JSON header with the run's metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from meebs.dataset import DatasetScan
from meebs.metadata import RunFacts, build_metadata, recipe_network
from meebs.models import SD15_CONFIGS, TINY_CONFIGS, TINY_TRAINED
from meebs.plan import Plan
from meebs.recipe import Recipe
from meebs.safetensors_io import canonical_header

# Bytes per number and the safetensors dtype name of each `output.save_precision`.
PRECISIONS = {"fp16": (2, "F16"), "bf16": (2, "BF16"), "fp32": (4, "F32")}
# The metadata values the plan cannot know yet, written with the length they will have.
_SHA256_PLACEHOLDER = "0" * 64  # sshs_model_hash, and the base model's sha256 if unpinned
_LEGACY_HASH_PLACEHOLDER = "0" * 8  # kohya's ss_sd_model_hash of a single-file base


@dataclass(frozen=True)
class SizeEstimate:
    """One network file: its tensors and its size on disk."""

    precision: str  # output.save_precision
    parameters: int  # numbers stored, the per-module alphas included
    header_bytes: int  # 8-byte length + JSON header (tensor index and metadata)
    file_bytes: int

    def describe(self) -> str:
        """One line for `plan`: the size and the arithmetic behind it."""
        per_number, _ = PRECISIONS[self.precision]
        return (
            f"{self.file_bytes / 1e6:.1f} MB ({self.file_bytes:,} bytes) = "
            f"{self.parameters:,} parameters x {per_number} bytes ({self.precision}) "
            f"+ {self.header_bytes:,} bytes of header"
        )


def estimate_network_file(
    recipe: Recipe, scan: DatasetScan, plan: Plan, model: EmptyModel | None = None
) -> SizeEstimate:
    """The size of the recipe's final network file, without loading the base model.

    The metadata is the trainer's own (`build_metadata`); only the facts known after
    loading (the base model's hashes, fallbacks) are stand-ins of the right length.
    """
    shapes = network_shapes(recipe, model)
    metadata = build_metadata(
        recipe, scan, plan, _planned_facts(recipe), epoch=plan.epochs, step=plan.total_steps
    )
    return safetensors_size(shapes, recipe.output.save_precision, metadata)


def network_shapes(recipe: Recipe, model: EmptyModel | None = None) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor the recipe's network file will hold."""
    network = (model or empty_model(recipe)).network
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


@dataclass(frozen=True)
class EmptyModel:
    """The recipe's base model and network with shapes but no weights (meta tensors)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    network: torch.nn.Module
    text_config: dict[str, Any]


def empty_model(recipe: Recipe) -> EmptyModel:
    """Build it in well under a second, whatever its size; the caller's random state is
    left alone (creating the network draws its init values)."""
    config_dir = _config_dir(recipe)
    text_config = _read_config(config_dir, "text_encoder")
    with torch.random.fork_rng(), init_empty_weights():
        unet = UNet2DConditionModel.from_config(_read_config(config_dir, "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
        vae = AutoencoderKL.from_config(_read_config(_vae_config_dir(recipe), "vae"))
        network = recipe_network(recipe, unet, text_encoder)
    return EmptyModel(unet, text_encoder, vae, network, text_config)


def safetensors_size(
    shapes: dict[str, tuple[int, ...]], precision: str, metadata: dict[str, str]
) -> SizeEstimate:
    """The size of the file `meebs.network.save_network` writes for these tensors.

    safetensors stores tensors of one dtype back to back, ordered by name, with no
    padding; `save_network` adds `sshs_model_hash` to the metadata.
    """
    per_number, dtype = PRECISIONS[precision]
    index: dict[str, object] = {
        "__metadata__": {**metadata, "sshs_model_hash": _SHA256_PLACEHOLDER}
    }
    offset = 0
    for name in sorted(shapes):
        numel = math.prod(shapes[name])
        end = offset + numel * per_number
        index[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    header_bytes = len(canonical_header(index))
    return SizeEstimate(
        precision=precision,
        parameters=sum(math.prod(shape) for shape in shapes.values()),
        header_bytes=header_bytes,
        file_bytes=header_bytes + offset,
    )


def _config_dir(recipe: Recipe, part: str = "unet") -> Path:
    """Where the configs of the base model the recipe trains on are.

    A diffusers folder brings its own configs; a single file is always read as SD 1.5
    (`meebs.models`), and so is a path that does not exist yet: `plan` works before
    `fetch-model` has run.
    """
    model = recipe.model
    if model.path is not None and (Path(model.path) / part / "config.json").is_file():
        return Path(model.path)
    return {"tiny": TINY_CONFIGS, "tiny-trained": TINY_TRAINED}.get(model.builtin, SD15_CONFIGS)


def _vae_config_dir(recipe: Recipe) -> Path:
    return _config_dir(recipe, "vae")


def _read_config(config_dir: Path, part: str) -> dict[str, Any]:
    return json.loads((config_dir / part / "config.json").read_text(encoding="utf-8"))


def _planned_facts(recipe: Recipe) -> RunFacts:
    """What training will record about the run, as far as the recipe says it."""
    model, train = recipe.model, recipe.train
    path = Path(model.path) if model.path else None
    single_file = path is not None and not path.is_dir()
    return RunFacts(
        base_name=str(model.builtin) if path is None else path.stem if single_file else path.name,
        base_sha256=model.sha256 or _SHA256_PLACEHOLDER,
        base_legacy_hash=_LEGACY_HASH_PLACEHOLDER if single_file else None,
        mixed_precision=train.mixed_precision,
        optimizer=train.optimizer,
        attention=train.attention,
        fallbacks=(),
    )
