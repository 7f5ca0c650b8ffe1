"""Put saved networks on a base model for generation, each with its own multipliers.

Several networks may be applied at once (A1111 stacks them): each is loaded with
lycoris' kohya loader (`meebs.network.load_file.load_network_file`), which hooks the model's
forwards and computes `W·x + multiplier·ΔW·x`, so a multiplier of 0 gives exactly the
base model's output. Text-encoder and UNet modules get separate multipliers, as
A1111's `<lora:NAME:TE:UNET>` asks. No weights are merged (lycoris' `merge_to` scales
LoHA by (alpha/dim)² and would be wrong).

A file is checked before anything is loaded: that it is a network at all, for SD 1.x,
and that every module fits a layer of this model in shape. The message names the key.
"""

from __future__ import annotations

from pathlib import Path

from lycoris.kohya import LycorisNetworkKohya
from torch import nn

from meebs.errors import MeebsError
from meebs.files.safetensors_io import shown
from meebs.models.base import BaseModel
from meebs.network.algo_tensors import (
    ALGO_MARKERS,
    TE_PREFIX,
    UNET_PREFIX,
    change_text,
    misfit,
    modules_of,
)
from meebs.network.build import lycoris_text_encoder
from meebs.network.load_file import load_network_file
from meebs.network.network_file import read_network_header


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor shapes, metadata) of a network file, reading no tensor data.

    MeebsError when the file is not safetensors, holds no network tensors, is a network
    for SDXL, or has a dtype or factor shapes no loader can use rightly
    (`meebs.network.network_file`).
    """
    header = read_network_header(path)
    return header.shapes, header.metadata


def check_fits(path: Path, shapes: dict[str, tuple[int, ...]], base: BaseModel) -> None:
    """MeebsError naming the first key that has no layer, or the wrong shape, in `base`."""
    layers = _layers(base)
    for module, factors in sorted(modules_of(shapes).items()):
        if not module.startswith((UNET_PREFIX, TE_PREFIX)):
            continue
        weight = getattr(layers.get(module), "weight", None)
        if weight is None:
            key = f"{module}.{min(factors)}"
            raise MeebsError(
                f"{path}: key {shown(key)} matches no layer of this model "
                "(a network for another architecture?)"
            )
        problem = misfit(module, factors, tuple(weight.shape))
        if problem:
            have, why = problem
            raise MeebsError(
                f"{path}: key {shown(module)}.* makes a {change_text(have)} change, but that "
                f"layer of this model is {list(weight.shape)} ({why})"
            )


def apply_network(path: Path, base: BaseModel, te: float, unet: float) -> LycorisNetworkKohya:
    """Check `path` against `base`, hook it in and set its multipliers."""
    shapes, _ = read_shapes(path)
    check_fits(path, shapes, base)
    network = load_network_file(path, base.unet, base.text_encoder)
    set_multipliers(network, te=te, unet=unet)
    return network


def set_multipliers(network: LycorisNetworkKohya, *, te: float, unet: float) -> None:
    """Scale the network's text-encoder and UNet modules separately (A1111's TE/UNet)."""
    for module in network.text_encoder_loras:
        module.multiplier = te
    for module in network.unet_loras:
        module.multiplier = unet


def remove_network(network: LycorisNetworkKohya) -> None:
    """Unhook the network: the model computes exactly what it did before `apply_network`."""
    for module in network.unet_loras + network.text_encoder_loras:
        module.restore()


def algo_of(keys: list[str]) -> str:
    """The algorithm(s) a file's tensor names show, e.g. "LoHA"."""
    found = sorted({algo for key in keys for marker, algo in ALGO_MARKERS.items() if marker in key})
    return " + ".join(found) or "unknown"


def _layers(base: BaseModel) -> dict[str, nn.Module]:
    """kohya module name -> layer, named exactly as lycoris names them when loading."""
    parts = ((UNET_PREFIX, base.unet), (TE_PREFIX, lycoris_text_encoder(base.text_encoder)))
    return {
        prefix + name.replace(".", "_"): module
        for prefix, part in parts
        for name, module in part.named_modules()
        if name
    }
