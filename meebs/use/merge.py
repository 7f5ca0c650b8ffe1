"""`merge`: bake one or more networks into the base model, pinned, in a loader's layout.

Each network is given as `FILE[:WEIGHT]` (weight 1 by default, negative allowed). For
every module of the file the delta is rebuilt from its tensors (`meebs.network.deltas`, our own
formula, not lycoris' `merge_to`, REFERENCE §9), scaled by the weight and added to the
layer the kohya name points at. Every key must land on a layer of the right shape: a
file for another architecture stops the merge before anything is written.

The result is either a single `.safetensors` checkpoint in the original LDM layout
(`--into NAME.safetensors`, what AUTOMATIC1111 and ComfyUI load from their checkpoints
folder; fp16 by default, like published checkpoints) or a diffusers folder (`--into DIR`;
text encoder with `text_model.` keys, as ComfyUI's loader expects; fp32 by default, as
before). Either comes with `<name>.sha256`, so it can be trained on or generated with as
`model.path` + `model.sha256`.

A merge from a single `.safetensors` base into a single file is streamed
(`merge_single_file`): the base is never loaded as a model. The output header is computed
first from the base's; then each tensor is read, gets the networks' changes if a module
names its layer, is written and dropped, so memory holds a tensor or two, never the
model. The bytes are the ones the in-memory path wrote (same keys, order, dtype steps and
metadata; tested against it). Other bases (built-ins, diffusers folders) are loaded,
merged in place and written tensor by tensor (`save_ldm_file`).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor, nn

from meebs.errors import MeebsError
from meebs.files.atomic_write import write_text_atomic
from meebs.files.safetensors_io import read_header, shown
from meebs.interop.diffusers_export import save_diffusers_folder
from meebs.interop.ldm_export import (
    PlannedTensor,
    ldm_parts_state_dict,
    save_ldm_file,
    write_ldm_file,
)
from meebs.models.base import BaseModel
from meebs.models.loading import load_base_model
from meebs.models.single_file import PICKLE_SUFFIXES, SingleFile, TensorReader, open_single_file
from meebs.network.deltas import MARKERS, bias_delta, module_delta
from meebs.network.kohya_names import kohya_layers, looks_like_sdxl
from meebs.network.network_file import check_one_prefix, load_network_tensors

PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
# The default when --save-precision is not given: a single file is shared and loaded
# like a published checkpoint (fp16, half the size); a folder keeps what it always was.
DEFAULT_PRECISION = {"file": "fp16", "folder": "fp32"}


@dataclass(frozen=True)
class WeightedNetwork:
    """One `FILE[:WEIGHT]` argument."""

    path: Path
    weight: float = 1.0


def parse_network_arg(text: str) -> WeightedNetwork:
    """`net.safetensors`, `net.safetensors:0.7`, `net.safetensors:-1`; anything else is refused.

    Only the part after the last ":" that follows the file's suffix is a weight, so a
    path without a weight is never cut in two.
    """
    path, sep, weight = text.rpartition(":")
    if not sep or "/" in weight or weight.endswith(".safetensors"):
        return WeightedNetwork(Path(text))
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not path or not math.isfinite(value):
        raise MeebsError(
            f"{text!r}: the weight after ':' must be a number, e.g. {path or 'net.safetensors'}:0.8"
        )
    return WeightedNetwork(Path(path), value)


def read_network(path: Path) -> dict[str, dict[str, Tensor]]:
    """The file's tensors grouped by module key: {module: {suffix: tensor}}, after the
    checks every network file gets (`load_network_tensors`: dtypes, NaN, factors)."""
    path = Path(path)
    if path.is_file():
        _check_names(path, {key: entry.shape for key, entry in read_header(path).tensors.items()})
    modules: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, tensor in load_network_tensors(path).items():
        module, _, suffix = key.partition(".")
        modules[module][suffix] = tensor
    return dict(modules)


def _check_names(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Merge's wording for a file that is no network, or one for SDXL."""
    if not any(key.endswith(MARKERS) for key in shapes):
        raise MeebsError(
            f"{path} is not a LoRA/LoCon/LoHA network: it has no lora_down/hada_w1 tensors"
        )
    check_one_prefix(path, shapes)
    sdxl = next((key for key in sorted(shapes) if looks_like_sdxl(key)), None)
    if sdxl:
        raise MeebsError(f"{path}: {_unplaced(sdxl.partition('.')[0])}")


def merge_into(
    unet: nn.Module, text_encoder: nn.Module, modules: dict[str, dict[str, Tensor]], weight: float
) -> None:
    """Add `weight` x each module's delta to the layer it names, in place.

    All names are checked before any weight changes; a shape mismatch found later leaves
    the in-memory model half merged, which is why callers write nothing on error.
    """
    layers = kohya_layers(unet, text_encoder)
    for module_key in sorted(modules):
        if module_key not in layers:
            raise MeebsError(_unplaced(module_key))
    with torch.no_grad():
        for module_key, tensors in sorted(modules.items()):
            layer = layers[module_key]
            layer_weight = layer.weight
            delta = module_delta(module_key, tensors, layer_weight.shape, base=layer_weight)
            layer_weight.add_(delta.to(layer_weight.dtype), alpha=weight)
            bias = layer.bias
            change = bias_delta(module_key, tensors, None if bias is None else bias.shape)
            if change is not None:
                bias.add_(change.to(bias.dtype), alpha=weight)


def merge(
    networks: list[WeightedNetwork],
    into: Path,
    *,
    builtin: str | None,
    model_path: Path | None,
    sha256: str | None,
    save_precision: str | None = None,
) -> str:
    """Merge `networks` into the base model and write `into` + `into.sha256`; return the pin.

    `into` ending in `.safetensors` is a single LDM-layout file, anything else a folder.
    """
    into = Path(into)
    pin_file = pin_path(into)
    kind = output_kind(into)
    precision = save_precision or DEFAULT_PRECISION[kind]
    dtype = PRECISIONS[precision]
    for target in (into, pin_file):
        if target.exists():
            raise MeebsError(f"{target} already exists; refusing to overwrite it")
    if not into.parent.is_dir():
        raise MeebsError(f"{into.parent} is not a folder: create it first")
    contents = [(network, read_network(network.path)) for network in networks]
    if kind == "file" and model_path is not None and _safetensors_file(Path(model_path)):
        base = open_single_file(Path(model_path).expanduser(), sha256)
        digest = merge_single_file(contents, base, into, precision)
        write_text_atomic(pin_file, f"{digest}  {into.name}\n")
        return digest
    model: BaseModel = load_base_model(
        builtin=builtin, path=model_path, sha256=sha256, allow_pickle=False
    )
    for network, modules in contents:
        try:
            merge_into(model.unet, model.text_encoder, modules, network.weight)
        except MeebsError as error:
            raise MeebsError(f"{network.path}: {error}") from None
    _refuse_non_finite(model, precision, networks)
    if kind == "file":
        digest = save_ldm_file(model, into, dtype)
    else:
        for part in (model.unet, model.vae, model.text_encoder):
            part.to(dtype)
        digest = save_diffusers_folder(model, into)
    write_text_atomic(pin_file, f"{digest}  {into.name}\n")
    return digest


def _safetensors_file(path: Path) -> bool:
    path = path.expanduser()
    return path.suffix.lower() == ".safetensors" and path.is_file()


def merge_single_file(
    contents: list[tuple[WeightedNetwork, dict[str, dict[str, Tensor]]]],
    base: SingleFile,
    into: Path,
    precision: str,
) -> str:
    """Write `base` with the networks merged into `into` (LDM layout), streamed; return
    its sha256.

    Every tensor of the output goes through the steps the in-memory path takes, so the
    bytes are the same: the base's tensor as `BaseModel` holds it (`.float()`), each
    network's delta (and a Full module's bias change) added in network order
    (`merge_into`'s `add_`), the output dtype, the NaN/inf check of UNet and
    text-encoder weights. Names are checked before the
    write starts; a delta or NaN error found while writing removes the temp file.
    """
    dtype = PRECISIONS[precision]
    networks = [network for network, _ in contents]
    layers = kohya_layers(base.unet, base.text_encoder)
    merges: dict[str, list[_Change]] = defaultdict(list)
    for network, modules in contents:
        for module_key in sorted(modules):
            if module_key not in layers:
                raise MeebsError(f"{network.path}: {_unplaced(module_key)}")
            layer, tensors = layers[module_key], modules[module_key]
            merges[base.key_of(layer.weight)].append(_Change(network, module_key, tensors))
            if "diff_b" in tensors:  # Full's bias change: checked here, added when written
                bias = None if layer.bias is None else layer.bias.shape
                try:
                    bias_delta(module_key, tensors, bias)
                except MeebsError as error:
                    raise MeebsError(f"{network.path}: {error}") from None
                change = _Change(network, module_key, tensors, bias=True)
                merges[base.key_of(layer.bias)].append(change)
    checked = {
        base.key_of(weight): (part_name, name)
        for part_name, part in (("UNet", base.unet), ("text encoder", base.text_encoder))
        for name, weight in part.named_parameters()
    }
    layer_shapes = {
        base.key_of(value): tuple(value.shape)
        for part in (base.unet, base.vae, base.text_encoder)
        for value in part.state_dict().values()
    }
    state = ldm_parts_state_dict(base.unet, base.vae, base.text_encoder)
    with base.reader() as reader:
        planned = {}
        for key, placeholder in state.items():
            source = base.key_of(placeholder)
            step = _MergedTensor(
                reader=reader,
                source=source,
                layer_shape=layer_shapes[source],
                shape=tuple(placeholder.shape),
                precision=precision,
                merges=merges.get(source, []),
                checked_as=checked.get(source),
                networks=networks,
            )
            planned[key] = PlannedTensor(step.shape, step.produce)
        return write_ldm_file(into, planned, dtype)


@dataclass(frozen=True)
class _Change:
    """One module's change to one tensor of the base: its weight, or (Full's `diff_b`)
    its bias."""

    network: WeightedNetwork
    module_key: str
    tensors: dict[str, Tensor]
    bias: bool = False

    def delta(self, current: Tensor) -> Tensor:
        """The change, for the tensor as merged so far (what `merge_into` gives `base`)."""
        try:
            if self.bias:
                change = bias_delta(self.module_key, self.tensors, current.shape)
                assert change is not None  # only modules with a diff_b get here
                return change
            return module_delta(self.module_key, self.tensors, current.shape, base=current)
        except MeebsError as error:
            raise MeebsError(f"{self.network.path}: {error}") from None


@dataclass(frozen=True)
class _MergedTensor:
    """One output tensor of `merge_single_file`, made when the writer asks for it."""

    reader: TensorReader
    source: str  # the base file's key
    layer_shape: tuple[int, ...]  # the diffusers parameter's shape, which deltas have
    shape: tuple[int, ...]  # the output's shape
    precision: str
    merges: list[_Change]
    checked_as: tuple[str, str] | None  # (part, parameter name) for the NaN/inf check
    networks: list[WeightedNetwork]

    def produce(self) -> Tensor:
        weight = self.reader.read(self.source)
        if weight.is_floating_point():
            weight = weight.float()  # what BaseModel does to every part it holds
        weight = weight.reshape(self.layer_shape)
        with torch.no_grad():
            for change in self.merges:
                delta = change.delta(weight)
                weight.add_(delta.to(weight.dtype), alpha=change.network.weight)
                del delta
        merged = weight.reshape(self.shape).to(PRECISIONS[self.precision]).contiguous()
        if self.checked_as is not None and not torch.isfinite(merged).all():
            raise _non_finite(self.networks, *self.checked_as, self.precision)
        return merged


def _refuse_non_finite(model: BaseModel, precision: str, networks: list[WeightedNetwork]) -> None:
    """Write nothing if a merged weight is NaN or inf in the output precision: every
    loader would draw black with it. fp16 ends at 65504, so a large weight may need fp32."""
    for part_name, part in (("UNet", model.unet), ("text encoder", model.text_encoder)):
        for name, weight in part.named_parameters():
            if not torch.isfinite(weight.detach().to(PRECISIONS[precision])).all():
                raise _non_finite(networks, part_name, name, precision)


def _non_finite(
    networks: list[WeightedNetwork], part_name: str, name: str, precision: str
) -> MeebsError:
    return MeebsError(
        f"{', '.join(str(n.path) for n in networks)}: the merged {part_name} "
        f"weight {name} is NaN or inf in {precision} (fp16 ends at 65504); "
        "nothing was written: lower the network's weight, or give "
        "--save-precision fp32"
    )


def output_kind(into: Path) -> str:
    """ "file" for `NAME.safetensors`, "folder" for anything else; pickle names are refused."""
    suffix = Path(into).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise MeebsError(
            f"{into}: merge writes no pickle files; name it {Path(into).stem}.safetensors "
            "for a single checkpoint, or give a folder name without a suffix"
        )
    return "file" if suffix == ".safetensors" else "folder"


def pin_path(into: Path) -> Path:
    """Where the sha256 of a merge output is written: next to it, `<name>.sha256`."""
    return into.with_name(into.name + ".sha256")


def _unplaced(module_key: str) -> str:
    name = shown(module_key)
    if looks_like_sdxl(module_key):
        return f"{name} is an SDXL key (kohya's SDXL naming): this network is not for SD 1.x"
    return f"{name} matches no layer of this SD 1.x base model"


def run_merge(args: argparse.Namespace, console: Console) -> int:
    """The `merge` command: parse, merge, print the pin as recipe keys."""
    builtin = args.model.removeprefix("builtin:") if args.model.startswith("builtin:") else None
    model_path = None if builtin is not None else Path(args.model)
    networks = [parse_network_arg(text) for text in args.networks]
    digest = merge(
        networks,
        Path(args.into),
        builtin=builtin,
        model_path=model_path,
        sha256=args.sha256,
        save_precision=args.save_precision,
    )
    for line in (
        f"{args.into}\nsha256 {digest}",
        f"use it with: model.path={args.into} model.sha256={digest}",
    ):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0
