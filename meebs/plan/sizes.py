"""How big each network file will be, known before training starts.

Version 1.3 of the original project exists because 1.1's files were ~100 MB: the rank
decides the file size, and a user should see that size in `plan`, not after a GPU-day.

The estimate is exact rather than a rule of thumb: the network is created by the same
code the trainer uses (`meebs.network.build.build_network`), but on a base model whose weights
are never allocated (accelerate's `init_empty_weights`: the modules have shapes only), so
the tensor names and shapes are the real ones and the full SD 1.5 costs well under a
second. Each file is then sized like `meebs.files.safetensors_io` writes it: tensor bytes in
the save precision plus the canonical JSON header (padded to 8 bytes). Every algorithm
gives its own tensors this way (LoKr's Kronecker halves, Diag-OFT's blocks, IA3's one
number per channel, Full's whole-layer diff and diff_b, DoRA's dora_scale): lycoris'
Full and DoRA copy the base weight to the CPU when built and saved, which a weightless
weight cannot give, so that copy is the weightless weight itself while the network is
built and its tensors listed (`_WeightlessCopies`).

The header holds the run's facts, and their lengths differ from file to file: the epoch,
the step and the title of each file, the precision, optimizer and attention this machine
falls back to (found by the trainer's own functions), and the validation's recommended
epoch in the final file. Hashes not known yet have a fixed length. Only the recommended
epoch is decided by the run: a file whose size depends on it gets a range.
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
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextConfig, CLIPTextModel

from meebs.data.folders import DatasetScan
from meebs.errors import RecipeError
from meebs.files.safetensors_io import canonical_header
from meebs.models.base import SD15_CONFIGS, TINY_CONFIGS
from meebs.models.builtin_models import TINY_TRAINED
from meebs.models.machine import make_accelerator, set_attention
from meebs.network.optim import build_optimizer
from meebs.plan.metadata import RECOMMENDED_EPOCH_KEY, RunFacts, build_metadata, recipe_network
from meebs.plan.steps import Plan
from meebs.recipe.schema import Recipe

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


@dataclass(frozen=True)
class PlannedFile:
    """One file `plan` lists: its size, or the range the run's choices leave open."""

    epoch: int
    name: str
    least: SizeEstimate
    most: SizeEstimate

    def size_text(self) -> str:
        """The bytes, exact ("19,824,524") or a range ("19,824,524 to 19,824,532"), and MB."""
        low, high = self.least.file_bytes, self.most.file_bytes
        exact = f"{low:,}" if low == high else f"{low:,} to {high:,}"
        return f"{exact} ({high / 1e6:.1f} MB)"


def plan_file_sizes(
    recipe: Recipe, scan: DatasetScan, plan: Plan, model: EmptyModel | None = None
) -> list[PlannedFile]:
    """The size of every network file the run writes, in the order written, without
    loading the base model: each with the metadata the trainer will write into it."""
    model = model or empty_model(recipe)
    shapes = network_shapes(recipe, model)
    facts = planned_facts(recipe, model)
    files = []
    for epoch, name in plan.files:
        sizes = sorted(
            (
                safetensors_size(shapes, recipe.output.save_precision, metadata)
                for metadata in _file_metadata(recipe, scan, plan, facts, epoch)
            ),
            key=lambda size: size.file_bytes,
        )
        files.append(PlannedFile(epoch, name, sizes[0], sizes[-1]))
    return files


def describe_sizes(files: list[PlannedFile]) -> str:
    """One line for `plan`: the arithmetic behind the sizes of its files table."""
    first = files[0].least
    per_number, _ = PRECISIONS[first.precision]
    headers = sorted({size.header_bytes for file in files for size in (file.least, file.most)})
    span = f"{headers[0]:,}" if len(headers) == 1 else f"{headers[0]:,} to {headers[-1]:,}"
    return (
        f"{first.parameters:,} parameters x {per_number} bytes ({first.precision}) "
        f"+ {span} bytes of header (the run's facts)"
    )


def _file_metadata(
    recipe: Recipe, scan: DatasetScan, plan: Plan, facts: RunFacts, epoch: int
) -> list[dict[str, str]]:
    """The metadata the epoch's file may get: one, or one per length of the recommended
    epoch (the final file of a validated run names one of the saved epochs)."""
    step = epoch * plan.steps_per_epoch
    metadata = build_metadata(recipe, scan, plan, facts, epoch=epoch, step=step)
    if epoch != plan.epochs or not recipe.validation.enabled:
        return [metadata]
    by_length = {len(str(saved)): saved for saved, _ in plan.files}
    return [{**metadata, RECOMMENDED_EPOCH_KEY: str(e)} for e in by_length.values()]


def network_shapes(recipe: Recipe, model: EmptyModel | None = None) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor the recipe's network file will hold."""
    network = (model or empty_model(recipe)).network
    with _WeightlessCopies():
        return {key: tuple(value.shape) for key, value in network.state_dict().items()}


class _WeightlessCopies(TorchFunctionMode):
    """Inside it, `.cpu()` of a weightless (meta) tensor is that tensor, not an error.

    lycoris' Full module keeps a CPU copy of the layer's weight and bias and saves
    `weight - copy`; DoRA takes its magnitude from a CPU copy of the weight. On the plan's
    weightless model the copy has nothing to copy, and its shape is all that is needed.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


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
        with _WeightlessCopies():
            network = recipe_network(recipe, unet, text_encoder)
    return EmptyModel(unet, text_encoder, vae, network, text_config)


def safetensors_size(
    shapes: dict[str, tuple[int, ...]], precision: str, metadata: dict[str, str]
) -> SizeEstimate:
    """The size of the file `meebs.network.save.save_network` writes for these tensors.

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
    (`meebs.models.single_file`), and so is a path that does not exist yet: `plan` works before
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


def planned_facts(recipe: Recipe, model: EmptyModel) -> RunFacts:
    """What training on this machine will record about the run, as far as known before
    the base model loads: its hashes are stand-ins of the right length."""
    base = recipe.model
    path = Path(base.path) if base.path else None
    single_file = path is not None and not path.is_dir()
    return RunFacts(
        base_name=str(base.builtin) if path is None else path.stem if single_file else path.name,
        base_sha256=base.sha256 or _SHA256_PLACEHOLDER,
        base_legacy_hash=_LEGACY_HASH_PLACEHOLDER if single_file else None,
        **_machine_choices(recipe, model),
    )


def _machine_choices(recipe: Recipe, model: EmptyModel) -> dict[str, Any]:
    """The precision, attention and optimizer this machine gives the recipe, and the
    fallback notes on the way, in the trainer's order: asked of the trainer's own
    functions (the attention of the weightless UNet; the optimizer of one probe number on
    the training device), so a note's every character is the one the file will hold."""
    accelerator, fallbacks = make_accelerator(recipe)
    attention = set_attention(model, recipe, fallbacks)  # it uses the model's .unet only
    probe = torch.nn.Parameter(torch.zeros(1, device=accelerator.device))
    try:
        _, optimizer, notes = build_optimizer([{"params": [probe]}], recipe)
    except (TypeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RecipeError(
            f"train.optimizer_args: {recipe.train.optimizer} refuses them ({reason}); "
            "fix or remove them"
        ) from None
    return {
        "mixed_precision": accelerator.mixed_precision,
        "attention": attention,
        "optimizer": optimizer,
        "fallbacks": (*fallbacks, *notes),
    }
