"""What each LyCORIS algorithm's tensors are, and what change of a layer they rebuild.

One table of every algorithm `network.algo` trains, by lycoris-lora 4.1.3's tensor names,
so that the file check (`network_file`), the merge (`deltas`) and the loader (`build`)
agree on what a module is and which algorithm it is.

Whether a module fits a layer of a given model is checked where the model is: `misfit`
says what change the factors rebuild, from the header alone, and why it does not fit
(Diag-OFT and IA3 change the layer's own shape: their blocks or scales must match its
outputs or inputs; a DoRA magnitude must be one number per output or per input).
A1111 reshapes a product of the right element count, so transposed factors become a
wrong image there; here they are refused (a square layer's cannot be told apart).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

from meebs.errors import quoted

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
# Tensor-name markers of each algorithm, as kohya and LyCORIS write them (a key holds one).
ALGO_MARKERS = {
    "hada_": "LoHA",
    "lokr_": "LoKr",
    "lora_down": "LoRA/LoCon",
    ".a1.weight": "GLoRA",
    ".oft_blocks": "Diag-OFT",
    ".diff": "Full",
    ".on_input": "IA3",
}
# The tensors of each algorithm's module, by the suffix lycoris-lora 4.1.3's state_dict
# gives them (after the module name and a dot); any module may add COMMON_SUFFIXES.
ALGO_SUFFIXES: dict[str, frozenset[str]] = {
    "LoHA": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "LoRA/LoCon": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "LoKr": frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    ),
    "GLoRA": frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}),
    "Diag-OFT": frozenset({"oft_blocks", "rescale"}),
    "Full": frozenset({"diff", "diff_b"}),
    "IA3": frozenset({"weight", "on_input"}),
}
# alpha: the scale alpha / rank (Diag-OFT: its norm constraint); dora_scale: DoRA's magnitude.
COMMON_SUFFIXES = frozenset({"alpha", "dora_scale"})
# The algorithms lycoris trains with DoRA (`dora_wd`), and those whose file holds an alpha.
DORA_ALGOS = frozenset({"LoHA", "LoRA/LoCon", "LoKr"})
ALPHA_ALGOS = frozenset({"LoHA", "LoRA/LoCon", "LoKr", "GLoRA", "Diag-OFT"})
# The algorithms whose change is computed from the layer's own weight (`needs_base`).
BASE_ALGOS = frozenset({"GLoRA", "Diag-OFT", "IA3"})
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LORA_FACTORS = ("lora_up.weight", "lora_down.weight")
GLORA_FACTORS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
# The width of SD 2.x's text context (OpenCLIP ViT-H); SD 1.x's is 768.
_SD2_WIDTH = 1024

Shape = tuple[int, ...]
V = TypeVar("V")


def modules_of(by_key: dict[str, V]) -> dict[str, dict[str, V]]:
    """{module: {suffix: value}}: `lora_unet_x.lora_up.weight` is module `lora_unet_x`."""
    modules: dict[str, dict[str, V]] = {}
    for key, value in by_key.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = value
    return modules


def module_algos(suffixes: Iterable[str]) -> list[str]:
    """Every algorithm (ALGO_SUFFIXES' names) that one of a module's tensors belongs to."""
    names = set(suffixes)
    return [algo for algo, own in ALGO_SUFFIXES.items() if names & own]


def module_algo(suffixes: Iterable[str]) -> str | None:
    """The algorithm of a module's tensors ("LoHA", "LoKr", ...); None for none or several."""
    found = module_algos(suffixes)
    return found[0] if len(found) == 1 else None


def needs_base(suffixes: Iterable[str]) -> bool:
    """Whether the module's change is computed from the layer's own weight: GLoRA
    (W·a1·a2), Diag-OFT (a rotation of W), IA3 (a scale of W) and DoRA (W + dW renormed)."""
    names = set(suffixes)
    return module_algo(names) in BASE_ALGOS or "dora_scale" in names


def module_rank(factors: dict[str, Shape]) -> int | None:
    """The rank alpha is divided by, as A1111 and ComfyUI read it: LoHA `hada_w1_b`,
    LoRA `lora_down`, LoKr the factored half's `lokr_w2_b` (else `lokr_w1_b`; none when
    both halves are full matrices), GLoRA `a2`; None for the rest."""
    for name in ("hada_w1_b", "lora_down.weight", "lokr_w2_b", "lokr_w1_b", "a2.weight"):
        if name in factors:
            return _size(factors, name, 0)
    return None


def _size(factors: dict[str, Shape], name: str, axis: int) -> int:
    shape = factors.get(name, ())
    return shape[axis] if len(shape) > axis else 1


def _lokr_full(f: dict[str, Shape]) -> bool:
    """Both Kronecker halves stored whole: lycoris and the loaders scale by 1, not alpha/rank."""
    return "lokr_w1" in f and "lokr_w2" in f


def _lokr_half(f: dict[str, Shape], i: int) -> Shape:
    """The shape of Kronecker half i: lokr_w{i}, w_a @ w_b, or Tucker (t2, w2_a, w2_b)."""
    if f"lokr_w{i}" in f:
        return f[f"lokr_w{i}"]
    a, b = f[f"lokr_w{i}_a"], f[f"lokr_w{i}_b"]
    if f"lokr_t{i}" in f:
        return (a[1], b[1], *f[f"lokr_t{i}"][2:])
    return a[0], b[1]


def _rebuilt(factors: dict[str, Shape]) -> tuple[Shape, bool] | None:
    """(the change a checked module's factors rebuild, whether it is flattened to
    [out, in·k·k]); None where the layer decides it (Diag-OFT, IA3) or for no algorithm."""
    f, algo = factors, module_algo(factors)
    if algo == "LoHA" and "hada_t1" in f:
        return (f["hada_w1_a"][1], f["hada_w1_b"][1], *f["hada_t1"][2:]), False
    if algo == "LoHA":
        return (f["hada_w1_a"][0], f["hada_w1_b"][1]), True
    if algo == "LoRA/LoCon" and "lora_mid.weight" in f:
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        return (up[0], down[1], *f["lora_mid.weight"][2:]), False
    if algo == "LoRA/LoCon":
        return (f["lora_up.weight"][0], *f["lora_down.weight"][1:]), False
    if algo == "LoKr":
        (a, c), w2 = _lokr_half(f, 1), _lokr_half(f, 2)
        return (a * w2[0], c * w2[1], *w2[2:]), len(w2) == 2
    if algo == "GLoRA":
        return (f["b1.weight"][0], *f["b2.weight"][1:]), False
    if algo == "Full":
        return f["diff"], False
    return None


def delta_shape(factors: dict[str, Shape]) -> Shape | None:
    """The shape of the weight change a checked module's factors rebuild: [out, in·k·k]
    for plain LoHA (lycoris' layout) and a LoKr whose second half is a matrix, the
    layer's own shape otherwise; None for Diag-OFT and IA3 (the layer's shape, if it fits)."""
    rebuilt = _rebuilt(factors)
    return None if rebuilt is None else rebuilt[0]


def misfit(module: str, factors: dict[str, Shape], layer: Shape) -> tuple[Shape, str] | None:
    """(the change the factors rebuild, why it cannot go on a layer whose weight is
    `layer`); None if it fits or cannot be told from shapes (no known algorithm)."""
    layer = tuple(layer)
    algo = module_algo(factors)
    if algo == "Diag-OFT":
        return _oft_misfit(module, factors, layer)
    if algo == "IA3":
        return _ia3_misfit(factors, layer)
    rebuilt = _rebuilt(factors)
    if rebuilt is None:
        return None
    have, flat = rebuilt
    want = _flat(layer) if flat else layer
    if have != want:
        return have, _why(module, have, want)
    dora = factors.get("dora_scale")
    if dora is not None and dora not in _dora_shapes(layer):
        why = f"its dora_scale {shape_text(dora)} is one number per neither output nor input"
        return have, why
    return None


def _why(module: str, have: Shape, want: Shape) -> str:
    if _flat(have) == _flat(want)[::-1]:
        return "its factors are transposed; A1111 would reshape them into a wrong image"
    if _SD2_WIDTH in have and ("attn2_to_k" in module or "attn2_to_v" in module):
        return "an SD 2.x network: its cross-attention reads a 1024-wide text context"
    if _SD2_WIDTH in have and module.startswith(TE_PREFIX):
        return "an SD 2.x network: its text encoder is 1024 wide"
    return "a network for another model size?"


def dora_on_output(dora: Shape, layer: Shape) -> bool:
    """Whether a dora_scale is one magnitude per output row of `layer` ([out, 1, ...],
    lycoris' default `wd_on_out`), not per input column ([1, in, ...], the DoRA paper's,
    which meebs trains and AUTOMATIC1111 applies)."""
    return len(layer) >= 2 and tuple(dora) == _dora_shapes(layer)[0]


def _dora_shapes(layer: Shape) -> tuple[Shape, ...]:
    """lycoris' dora_scale for this layer: [out, 1, ...] (`wd_on_out`) or [1, in, ...]."""
    if len(layer) < 2:
        return ()
    ones = (1,) * (len(layer) - 2)
    return (layer[0], 1, *ones), (1, layer[1], *ones)


def _oft_misfit(module: str, f: dict[str, Shape], layer: Shape) -> tuple[Shape, str] | None:
    """oft_blocks [n, s, s] rotate the layer's n·s outputs; rescale is [out, 1, ...]."""
    blocks = f["oft_blocks"]
    out = blocks[0] * blocks[1]
    if not layer or layer[0] != out:
        have = (out, *layer[1:])
        return have, f"its {blocks[0]} blocks of {blocks[1]} rotate {out} outputs; " + _why(
            module, have, layer
        )
    rescale = f.get("rescale")
    if rescale is not None and rescale != (out, *(1,) * (len(layer) - 1)):
        return layer, f"its rescale {shape_text(rescale)} is not [{out}{', 1' * (len(layer) - 1)}]"
    return None


def _ia3_misfit(f: dict[str, Shape], layer: Shape) -> tuple[Shape, str] | None:
    """weight: [n] on a Linear, [1, n, 1, 1] on a conv; n = out (or in, `on_input`)."""
    weight = f["weight"]
    channels = math.prod(weight)
    form = (channels,) if len(layer) == 2 else (1, channels, *(1,) * (len(layer) - 2))
    if len(layer) >= 2 and weight == form and channels in layer[:2]:
        return None
    return weight, (
        f"its weight {shape_text(weight)} scales neither the {layer[0] if layer else 0} "
        "outputs nor the inputs of this layer"
    )


def change_bound(f: dict[str, tuple[float, Shape]]) -> float:
    """An upper bound of |dW| from each factor's largest |value|: every entry of a product
    sums rank (Tucker: rank x rank) terms; LoHA multiplies two products, LoKr takes their
    Kronecker product; then alpha / rank. GLoRA's W·a1·a2, Diag-OFT's and IA3's change
    are bounded relative to the base weight (taken as 1: a base weight is far below it);
    DoRA's magnitude bounds its rows."""

    def peak(name: str) -> float:
        return f[name][0] if name in f else 0.0

    shapes = {suffix: shape for suffix, (_, shape) in f.items()}
    algo = module_algo(shapes)
    rank = max(1, module_rank(shapes) or 1)
    scale = (peak("alpha") if "alpha" in f else rank) / rank
    if algo == "LoHA":
        change = scale
        for i in (1, 2):
            core = rank * peak(f"hada_t{i}") if f"hada_t{i}" in f else 1.0
            change *= rank * core * peak(f"hada_w{i}_a") * peak(f"hada_w{i}_b")
    elif algo == "LoRA/LoCon":
        core = rank * peak("lora_mid.weight") if "lora_mid.weight" in f else 1.0
        change = scale * rank * core * peak("lora_up.weight") * peak("lora_down.weight")
    elif algo == "LoKr":
        change = 1.0 if _lokr_full(shapes) else scale
        for i in (1, 2):
            if f"lokr_w{i}" in f:
                change *= peak(f"lokr_w{i}")
            else:
                core = rank * peak(f"lokr_t{i}") if f"lokr_t{i}" in f else 1.0
                change *= rank * core * peak(f"lokr_w{i}_a") * peak(f"lokr_w{i}_b")
    elif algo == "GLoRA":
        width = _size(shapes, "a1.weight", 0)
        base_part = width * rank * peak("a1.weight") * peak("a2.weight")
        change = scale * (rank * peak("b1.weight") * peak("b2.weight") + base_part)
    elif algo == "Diag-OFT":
        change = max(2 * peak("oft_blocks"), peak("rescale"))
    elif algo == "Full":
        change = max(peak("diff"), peak("diff_b"))
    elif algo == "IA3":
        change = peak("weight")
    else:
        return 0.0
    return max(change, peak("dora_scale"))


def change_text(shape: Shape) -> str:
    """`64x32` for a message; cut when a stranger's file gave the shape 10,000 sizes."""
    return "x".join(map(str, shape)) if len(shape) <= 4 else shape_text(shape)


def shape_text(shape: Shape) -> str:
    """A shape for a message: `[64, 4]`, cut if a stranger's file gave it 10,000 sizes."""
    return quoted(list(shape), 60)


def _flat(shape: Shape) -> Shape:
    return (shape[0], math.prod(shape[1:])) if shape else shape
