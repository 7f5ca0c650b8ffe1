"""Starting a training from an existing network file (kohya's `network_weights`): the
file must fit the recipe's network tensor for tensor, and a misfit is named in recipe
terms (algo, dim, alpha, DoRA's axis) rather than as torch's size error."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lycoris.kohya import LycorisNetworkKohya
from lycoris.modules.diag_oft import DiagOFTModule
from torch import Tensor

from meebs.errors import MeebsError
from meebs.files.safetensors_io import shown
from meebs.network.algo_tensors import change_text, misfit, modules_of
from meebs.network.network_file import load_network_tensors, with_implied_alphas

# Tensors whose first dimension is the module's rank, in LoHA (with or without Tucker)
# and LoCon/LoRA files alike.
_RANK_SUFFIXES = (".hada_w1_b", ".hada_w2_b", ".lora_down.weight")


def load_network_weights(network: LycorisNetworkKohya, path: Path) -> None:
    """Start training from an existing network file (kohya's `network_weights`).

    The file is checked as every network file is (`load_network_tensors`: dtypes, NaN,
    factors that multiply). Every tensor must have a place of the same shape in
    `network`, and the alphas must agree (lycoris fixes each module's scale when it is
    built, so a copied alpha would be ignored). Modules the file lacks keep their init.
    """
    path = Path(path)
    stored = with_implied_alphas(load_network_tensors(path))
    _check_fits(network, path, stored)
    # float32 first: lycoris' full module adds the file's `diff` to the layer's weight in
    # the file's dtype, which would round the frozen weight itself to fp16
    by_module = modules_of(
        {
            key: value.float() if value.is_floating_point() else value
            for key, value in stored.items()
            if not key.endswith(".alpha")
        }
    )
    # Module by module: lycoris' full module turns its `diff` back into a weight in a
    # load hook that expects its own keys, so a module the file lacks is not touched.
    with torch.no_grad():
        for lora in network.loras:
            if lora.lora_name in by_module:
                lora.load_state_dict(by_module[lora.lora_name], strict=False)


def _check_fits(network: LycorisNetworkKohya, path: Path, stored: dict[str, Tensor]) -> None:
    """Raise MeebsError naming the first way the file's tensors do not fit `network`."""
    expected = network.state_dict()
    foreign = sorted(set(stored) - set(expected))
    if foreign:
        raise MeebsError(
            f"{path} does not fit this network: {len(foreign)} tensors such as "
            f"{shown(foreign[0])} "
            "have no place in it (trained with another algo, preset, use_tucker or parts?)"
        )
    layers = {lora.lora_name: tuple(lora.shape) for lora in network.loras}
    shapes = {key: tuple(tensor.shape) for key, tensor in stored.items()}
    for module, factors in sorted(modules_of(shapes).items()):
        problem = misfit(module, factors, layers[module]) if module in layers else None
        if problem:
            have, why = problem
            raise MeebsError(
                f"{path}: {module}.* makes a {change_text(have)} change, but that layer of "
                f"this model is {list(layers[module])} ({why})"
            )
    for key in sorted(stored, key=lambda name: not name.endswith(_RANK_SUFFIXES)):
        have, want = stored[key], expected[key]
        alpha = key.endswith(".alpha")  # one number (checked), [] or [1]
        if have.shape != want.shape and not alpha:
            raise MeebsError(f"{path} {_shape_mismatch(network, key, have, want)}")
        if alpha and not math.isclose(have.item(), want.item(), rel_tol=1e-3):
            module = key.split(".")[0]
            oft = any(isinstance(m, DiagOFTModule) for m in network.loras if m.lora_name == module)
            name = "constraint" if oft else "alpha"  # diag-oft keeps its constraint as alpha
            raise MeebsError(
                f"{path} was trained with {name} {have.item():g}, the recipe says "
                f"{name} {want.item():g} ({key})"
            )


def _shape_mismatch(network: LycorisNetworkKohya, key: str, have: Tensor, want: Tensor) -> str:
    """Explain a shape mismatch in recipe terms where only the rank (or DoRA's axis)
    differs."""
    per_output = have.dim() == want.dim() >= 2 and have.shape[1] == 1 and want.shape[0] == 1
    if key.endswith(".dora_scale") and per_output:
        return (
            f"has its DoRA magnitude {key} per output row {list(have.shape)} (lycoris' "
            f"default, wd_on_output); meebs trains it per input column {list(want.shape)}, "
            "so a training cannot start from this file"
        )
    same_rank = have.dim() != want.dim() or have.shape[0] == want.shape[0]
    if not key.endswith(_RANK_SUFFIXES) or same_rank or have.shape[1:] != want.shape[1:]:
        return f"has {key} of shape {list(have.shape)}, this network needs {list(want.shape)}"
    module_name = key.split(".")[0]
    shape = next(lora.shape for lora in network.loras if lora.lora_name == module_name)
    dim = "conv dim" if any(size != 1 for size in shape[2:]) else "dim"
    return (
        f"was trained with {dim} {have.shape[0]}, the recipe says {dim} {want.shape[0]} "
        f"({module_name})"
    )
