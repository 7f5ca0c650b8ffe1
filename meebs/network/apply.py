"""Put saved networks on a base model for generation, each with its own multipliers.

Several networks may be applied at once (A1111 stacks them): each is loaded with
lycoris' kohya loader (`meebs.network.build.load_network_file`), which hooks the model's
forwards and computes `W·x + multiplier·ΔW·x`, so a multiplier of 0 gives exactly the
base model's output. Text-encoder and UNet modules get separate multipliers, as
A1111's `<lora:NAME:TE:UNET>` asks. No weights are merged (lycoris' `merge_to` scales
LoHA by (alpha/dim)² and would be wrong).

A file is checked before anything is loaded: that it is a network at all, for SD 1.x,
and that every module fits a layer of this model in shape. The message names the key.
"""

from __future__ import annotations

import math
from pathlib import Path

from lycoris.kohya import LycorisNetworkKohya
from safetensors import SafetensorError, safe_open
from torch import nn

from meebs.errors import MeebsError
from meebs.models.base import BaseModel
from meebs.network.build import load_network_file, lycoris_text_encoder

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
# Tensor-name markers of each algorithm, as kohya and LyCORIS write them.
ALGO_MARKERS = {"hada_": "LoHA", "lokr_": "LoKr", "lora_down": "LoRA/LoCon"}
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_")


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor shapes, metadata) of a network file, reading no tensor data.

    MeebsError when the file is not safetensors, holds no network tensors, or is a
    network for SDXL.
    """
    path = Path(path)
    if not path.is_file():
        raise MeebsError(f"network file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as stream:
            shapes = {key: tuple(stream.get_slice(key).get_shape()) for key in stream.keys()}  # noqa: SIM118 (not iterable)
            metadata = stream.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise MeebsError(f"{path} is not a readable safetensors file ({error})") from None
    if not any(marker in key for key in shapes for marker in ALGO_MARKERS):
        raise MeebsError(
            f"{path} is not a LoRA/LyCORIS network: none of its {len(shapes)} tensors is "
            f"a {'/'.join(ALGO_MARKERS)}* weight"
        )
    sdxl = next((key for key in sorted(shapes) if key.startswith(_SDXL_PREFIXES)), None)
    if sdxl or metadata.get("ss_base_model_version", "").startswith("sdxl"):
        where = f"key {sdxl}" if sdxl else "ss_base_model_version"
        raise MeebsError(f"{path} is an SDXL network ({where}); meebs generates with SD 1.x")
    return shapes, metadata


def check_fits(path: Path, shapes: dict[str, tuple[int, ...]], base: BaseModel) -> None:
    """MeebsError naming the first key that has no layer, or the wrong shape, in `base`."""
    layers = _layers(base)
    for key in sorted(shapes):
        module = key.split(".")[0]
        if not module.startswith((UNET_PREFIX, TE_PREFIX)):
            continue
        weight = getattr(layers.get(module), "weight", None)
        if weight is None:
            raise MeebsError(
                f"{path}: key {key} matches no layer of this model "
                "(a network for another architecture?)"
            )
        want = (weight.shape[0], math.prod(weight.shape[1:]))
        have = _delta_shape(shapes, module)
        if have is not None and have != want:
            raise MeebsError(
                f"{path}: key {module}.* makes a {have[0]}x{have[1]} change, but that layer "
                f"of this model is {list(weight.shape)} (a network for another model size?)"
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


def _delta_shape(shapes: dict[str, tuple[int, ...]], module: str) -> tuple[int, int] | None:
    """(out, in·kernel) of the module's weight change; None where Tucker hides it."""
    if f"{module}.hada_t1" in shapes or f"{module}.lora_mid.weight" in shapes:
        return None
    for out_key, in_key in (("hada_w1_a", "hada_w1_b"), ("lora_up.weight", "lora_down.weight")):
        up, down = shapes.get(f"{module}.{out_key}"), shapes.get(f"{module}.{in_key}")
        if up is not None and down is not None:
            return up[0], math.prod(down[1:])
    return None
