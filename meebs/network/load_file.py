"""Applying a saved network file to a model for generation, through lycoris' kohya
loader, with our preset and text-encoder naming (`meebs.network.build`).

lycoris-lora 4.1.3's loader cannot build every module it is handed: (IA)^3 modules and
DoRA magnitudes per input column are built or set here instead, and LoKr modules, whose
factor it guesses (`meebs.network.lokr_file`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from lycoris.modules.ia3 import IA3Module
from torch import Tensor, nn

from meebs.errors import MeebsError
from meebs.files.safetensors_io import shown
from meebs.network.algo_tensors import dora_on_output, modules_of
from meebs.network.build import apply_sd15_preset, lycoris_text_encoder
from meebs.network.lokr_file import lokr_module
from meebs.network.network_file import load_network_tensors, with_implied_alphas


def load_network_file(
    path: Path, unet: nn.Module, text_encoder: nn.Module, *, multiplier: float = 1.0
) -> LycorisNetworkKohya:
    """Apply a saved network to `unet` and `text_encoder` for generation.

    diffusers cannot load LoHA files, so this goes through lycoris' kohya loader, with our
    preset and text-encoder naming. Unlike AUTOMATIC1111 and ComfyUI, a module that
    matches no layer of the model is an error here, not a silently dropped key.
    """
    path = Path(path)
    weights = with_implied_alphas(load_network_tensors(path))
    apply_sd15_preset()
    wrapped_text_encoder = lycoris_text_encoder(text_encoder)
    own = {key.split(".")[0] for key in weights if key.endswith(".on_input") or ".lokr_" in key}
    others = {key: value for key, value in weights.items() if key.split(".")[0] not in own}
    per_input = _per_input_dora(others, wrapped_text_encoder, unet)
    try:
        network, _ = create_network_from_weights(
            multiplier, str(path), None, wrapped_text_encoder, unet, weights_sd=others
        )
        _set_per_input_dora(network, weights, per_input)
        _add_own_modules(network, weights, own, wrapped_text_encoder, unet, multiplier)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as error:
        # A module whose shapes do not fit the layer it names.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise MeebsError(f"{path}: lycoris cannot build a module from it ({reason})") from None
    network.loras = network.text_encoder_loras + network.unet_loras
    loaded = {lora.lora_name for lora in network.loras}
    unplaced = sorted({key.split(".")[0] for key in weights} - loaded)
    if unplaced:
        raise MeebsError(
            f"{path}: {len(unplaced)} modules match no layer of this model, "
            f"e.g. {shown(unplaced[0])}"
        )
    network.apply_to(wrapped_text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    return network


def _named_layers(text_encoder: nn.Module, unet: nn.Module) -> dict[str, nn.Module]:
    """Every layer of both parts by its kohya module name (`lora_unet_…`, `lora_te_…`)."""
    parts = (
        (LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER, text_encoder),
        (LycorisNetworkKohya.LORA_PREFIX_UNET, unet),
    )
    return {
        f"{prefix}_{name}".replace(".", "_"): layer
        for prefix, part in parts
        for name, layer in part.named_modules()
    }


def _per_input_dora(
    weights: dict[str, Tensor], text_encoder: nn.Module, unet: nn.Module
) -> set[str]:
    """The DoRA modules whose magnitude is per input column ([1, in, ...]: meebs' own,
    lycoris' `wd_on_out=False`). lycoris 4.1.3's loader builds every DoRA module per
    output row and cannot copy such a magnitude into it, so each of these gets, in
    `weights` (a copy the caller owns), a stand-in of the per-output shape, replaced by
    the file's own magnitude and axis once lycoris has built the module
    (`_set_per_input_dora`)."""
    layers = _named_layers(text_encoder, unet)
    found = set()
    for key in [key for key in weights if key.endswith(".dora_scale")]:
        name = key.split(".")[0]
        weight = getattr(layers.get(name), "weight", None)
        if weight is None or weight.dim() < 2:
            continue  # no such layer: reported as unplaced by the caller
        if not dora_on_output(tuple(weights[key].shape), tuple(weight.shape)):
            weights[key] = torch.ones(weight.shape[0], *[1] * (weight.dim() - 1))
            found.add(name)
    return found


def _set_per_input_dora(
    network: LycorisNetworkKohya, weights: dict[str, Tensor], names: set[str]
) -> None:
    """Give the modules `_per_input_dora` found their own magnitude, per input column, as
    lycoris' `wd_on_out=False` builds it (the only difference from a per-output module:
    `weight_decompose` reads `wd_on_out` and the magnitude's shape)."""
    for lora in network.unet_loras + network.text_encoder_loras:
        if lora.lora_name not in names:
            continue
        stored = weights[f"{lora.lora_name}.dora_scale"]
        lora.wd_on_out = False
        lora.dora_scale = nn.Parameter(stored.to(lora.dora_scale.dtype).clone())


def _add_own_modules(
    network: LycorisNetworkKohya,
    weights: dict[str, Tensor],
    names: set[str],
    text_encoder: nn.Module,
    unet: nn.Module,
    multiplier: float,
) -> None:
    """The modules `names`, built here rather than by lycoris 4.1.3's loader: (IA)^3,
    whose `IA3Module.make_module_from_state_dict` takes one tensor where its loader hands
    it two (`weight`, `on_input`), and would drop `on_input` anyway; and LoKr, whose
    factor that loader guesses wrongly (`meebs.network.lokr_file`)."""
    by_module = modules_of(weights)
    parts = (
        (LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER, text_encoder, network.text_encoder_loras),
        (LycorisNetworkKohya.LORA_PREFIX_UNET, unet, network.unet_loras),
    )
    for prefix, part, loras in parts:
        for name, layer in part.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name in names:
                loras.append(_own_module(lora_name, layer, by_module[lora_name], multiplier))


def _own_module(
    lora_name: str, layer: nn.Module, tensors: dict[str, Tensor], multiplier: float
) -> nn.Module:
    """The (IA)^3 or LoKr module of one module's `tensors` (by suffix) on `layer`."""
    if "on_input" not in tensors:
        return lokr_module(lora_name, layer, tensors, multiplier)
    on_input = bool(tensors["on_input"].item())
    module = IA3Module(lora_name, layer, multiplier, train_on_input=on_input)
    with torch.no_grad():
        module.weight.copy_(tensors["weight"])
    return module
