"""A LoKr module built from a file's tensors, for `meebs.network.load_file`.

lycoris-lora 4.1.3's `LokrModule.make_module_from_state_dict` does not take the Kronecker
factor from the file: it guesses it from the tensor shapes and builds a module with that
guess, which fails where the guess is wrong. Its first guess, the default factor, is
checked against `in` multiplied by the width of `lokr_w2_b`, which for a convolution
also holds the kernel (3 x 3), so it never holds there; its fallback, the larger side of
`lokr_w1`, factors one of `out` and `in` otherwise than training did wherever they
differ, e.g. the 4 latent channels of the tiny base's `conv_in`/`conv_out` (conv_dim 2:
32 = 4 x 8 but 4 = 1 x 4, not 2 x 2) or its layers at `factor` 16. Tucker files get a
rank from the wrong side of `lokr_w2_a` too (every 3 x 3 convolution of SD 1.5).

Here the module is built by lycoris' own constructor with a factor that gives the file's
first half (`lokr_w1`) for this layer: the constructor splits `out` and `in` by the same
`factorization(dim, factor)`, and that result only changes at a divisor of `out` or
`in`, so trying those (and the number above each) finds a factor wherever one exists.
"""

from __future__ import annotations

import torch
from lycoris.functional import factorization
from lycoris.modules.lokr import LokrModule
from torch import Tensor, nn

from meebs.network.algo_tensors import dora_on_output


def lokr_module(
    lora_name: str, layer: nn.Module, tensors: dict[str, Tensor], multiplier: float
) -> LokrModule:
    """The LoKr module of `tensors` (one module's, by suffix: `lokr_w1`, `alpha`, ...) on
    `layer`; ValueError if lycoris can build no module with these shapes."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    out_dim, in_dim = layer.weight.shape[:2]
    dora = shapes.get("dora_scale")
    module = LokrModule(
        lora_name,
        layer,
        multiplier,
        alpha=float(tensors["alpha"]),
        factor=_factor(out_dim, in_dim, _first_half(shapes)),
        use_tucker="lokr_t2" in shapes,
        decompose_both="lokr_w1_a" in shapes,
        weight_decompose=dora is not None,
        wd_on_out=dora is None or dora_on_output(dora, tuple(layer.weight.shape)),
        **_rank(shapes),
    )
    stored = {name: tensor for name, tensor in tensors.items() if name != "alpha"}
    built = {name: value for name, value in module.state_dict().items() if name != "alpha"}
    if {name: value.shape for name, value in built.items()} != {
        name: tensor.shape for name, tensor in stored.items()
    }:
        raise ValueError(f"{lora_name}: no LoKr module of lycoris has the shapes {shapes}")
    with torch.no_grad():
        for name, tensor in stored.items():
            getattr(module, name).copy_(tensor)
    return module


def _first_half(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(rows, columns) of `lokr_w1`, stored whole or as `lokr_w1_a @ lokr_w1_b`."""
    if "lokr_w1" in shapes:
        return shapes["lokr_w1"][:2]
    return shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1]


def _factor(out_dim: int, in_dim: int, first_half: tuple[int, int]) -> int:
    """A factor with which lycoris splits `out_dim` and `in_dim` into `first_half`'s
    sides (-1, lycoris' default, where it does); -1 where none does, so that the shape
    check names the module."""
    splits = {d for dim in (out_dim, in_dim) for d in range(1, dim + 1) if dim % d == 0}
    for factor in (-1, *sorted(splits | {d + 1 for d in splits})):
        if (factorization(out_dim, factor)[0], factorization(in_dim, factor)[0]) == first_half:
            return factor
    return -1


def _rank(shapes: dict[str, tuple[int, ...]]) -> dict[str, int | bool]:
    """lycoris' `lora_dim` (and `full_matrix` where both halves are stored whole, which
    lycoris then scales by 1 whatever the rank)."""
    if "lokr_t2" in shapes:
        return {"lora_dim": shapes["lokr_t2"][0]}
    for name in ("lokr_w1_a", "lokr_w2_a"):
        if name in shapes:
            return {"lora_dim": shapes[name][1]}
    return {"lora_dim": 1, "full_matrix": True}
