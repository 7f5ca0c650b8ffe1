"""A network file from anyone, checked before any of it is used.

generate, merge, inspect and `network.weights` read network files through here, so a file
that AUTOMATIC1111 or ComfyUI would apply wrongly without a word is refused by all four
with the same line, naming the file and the key:

* anything safetensors would refuse, and a key given twice (`read_header`);
* no LoRA/LyCORIS tensor at all, an SDXL network, or one layer under two prefixes
  (`lora_te_X` and `lora_te1_X`: ComfyUI maps both onto SD 1.x's text encoder and so
  applies that change twice);
* a dtype other than F16, BF16, F32 or F64: an integer, bool or 8-bit float factor holds
  quantized values whose scale is not in the file, and a loader casts them to garbage
  (an alpha may be an integer: kohya writes `torch.tensor(dim)` when alpha = dim; so
  may IA3's `on_input`, an int64 in lycoris);
* a module whose tensors are missing, empty or do not multiply (lycoris' `copy_`
  broadcasts a [out, 1] factor onto [out, rank] without a word), that mixes two
  algorithms, or that holds a tensor no module of its algorithm has (A1111 and ComfyUI
  drop it without a word); every algorithm `network.algo` trains is read: LoHA,
  LoRA/LoCon, LoKr, GLoRA, Diag-OFT, Full, IA3, and DoRA's `dora_scale` on the first three
  (the tensors of each, by lycoris-lora 4.1.3's names: ALGO_SUFFIXES);
* a NaN or inf anywhere, or factors whose change overflows float32: black or noise
  (`check_finite`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from meebs.errors import MeebsError, quoted
from meebs.files.safetensors_io import read_header, shown

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
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
ALPHA_DTYPES = FLOAT_DTYPES | {"I8", "I16", "I32", "I64", "U8"}
# One-number tensors that may be integers: lycoris keeps IA3's `on_input` as an int64.
_NUMBER_SUFFIXES = (".alpha", ".on_input")
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LORA_FACTORS = ("lora_up.weight", "lora_down.weight")
GLORA_FACTORS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_")
# The largest weight change a module may rebuild: float32 ends at 3.4e38.
MAX_CHANGE = 1e37
# The width of SD 2.x's text context (OpenCLIP ViT-H); SD 1.x's is 768.
_SD2_WIDTH = 1024

Shape = tuple[int, ...]
V = TypeVar("V")


@dataclass(frozen=True)
class NetworkHeader:
    """What a network file declares, checked: tensor shapes and dtypes, and metadata."""

    shapes: dict[str, Shape]
    dtypes: dict[str, str]
    metadata: dict[str, str]


def read_network_header(path: Path) -> NetworkHeader:
    """The header of the network file `path`; MeebsError on the first thing that is wrong
    with it (see the module docstring). No tensor data is read."""
    path = Path(path)
    if not path.is_file():
        raise MeebsError(f"network file {path} does not exist")
    header = read_header(path)
    shapes = {name: entry.shape for name, entry in header.tensors.items()}
    _check_is_network(path, shapes)
    _check_sd1(path, shapes, header.metadata)
    dtypes = {name: entry.dtype for name, entry in header.tensors.items()}
    _check_dtypes(path, dtypes)
    for module, factors in sorted(modules_of(shapes).items()):
        _check_module(path, module, factors)
    return NetworkHeader(shapes, dtypes, header.metadata)


def load_network_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a checked network file (`read_network_header`, `check_finite`)."""
    path = Path(path)
    read_network_header(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, error) from None
    check_finite(path, tensors.items())
    return tensors


def check_values(path: Path, header: NetworkHeader) -> None:
    """`check_finite` on the file's tensors, read one at a time (inspect reads no more)."""
    try:
        with safe_open(path, framework="pt") as stream:
            check_finite(path, ((key, stream.get_tensor(key)) for key in sorted(header.shapes)))
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> MeebsError:
    """What safetensors (Rust) refused after our own header check passed, in one line."""
    reason = (str(error).strip().splitlines() or ["unreadable"])[0][:200]
    return MeebsError(f"{path} is not a readable safetensors file ({reason})")


def check_finite(path: Path, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """MeebsError naming the first tensor that holds a NaN or inf, or the first module
    whose factors are so large that the change they rebuild overflows float32: applied or
    merged, either turns every image black or into noise; trained on, the loss is NaN at
    once. The bound is generous: any fp16 LoHA up to rank 1024 stays below 1e29."""
    peaks: dict[str, tuple[float, Shape]] = {}
    bad, count = [], 0
    for key, tensor in tensors:
        count += 1
        if tensor.is_floating_point() and not _finite(tensor):
            bad.append(key)
        elif tensor.numel() and tensor.dtype != torch.bool:
            peaks[key] = (float(tensor.abs().max()), tuple(tensor.shape))
    if bad:
        raise MeebsError(
            f"{path}: {shown(bad[0])} holds NaN or inf values ({len(bad)} of {count} tensors "
            "do); it would draw black or noise: the file is damaged or comes from a "
            "training that diverged"
        )
    for module, factors in sorted(modules_of(peaks).items()):
        bound = _change_bound(factors)
        if bound > MAX_CHANGE:
            largest = max(peak for peak, _ in factors.values())
            raise MeebsError(
                f"{path}: {shown(module)}: its factors (up to {largest:.3g}) rebuild a change "
                f"of up to {bound:.3g}, past float32: it would draw black; the file is damaged"
            )


def _change_bound(f: dict[str, tuple[float, Shape]]) -> float:
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


def with_implied_alphas(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors, plus the alpha A1111, ComfyUI and our merge read where a module has
    none: rank (a scale of 1) for LoHA, LoRA, LoKr and GLoRA, 0 (no constraint) for
    Diag-OFT. lycoris' loader cannot build such a module (`float(None)`)."""
    result = dict(tensors)
    for module, factors in modules_of({k: tuple(v.shape) for k, v in tensors.items()}).items():
        algo = module_algo(factors)
        if algo not in ALPHA_ALGOS or "alpha" in factors:
            continue
        implied = 0.0 if algo == "Diag-OFT" else float(module_rank(factors) or 1)
        result[f"{module}.alpha"] = torch.tensor(implied)
    return result


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


def change_text(shape: Shape) -> str:
    """`64x32` for a message; cut when a stranger's file gave the shape 10,000 sizes."""
    return "x".join(map(str, shape)) if len(shape) <= 4 else shape_text(shape)


def shape_text(shape: Shape) -> str:
    """A shape for a message: `[64, 4]`, cut if a stranger's file gave it 10,000 sizes."""
    return quoted(list(shape), 60)


def _flat(shape: Shape) -> Shape:
    return (shape[0], math.prod(shape[1:])) if shape else shape


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _check_is_network(path: Path, shapes: dict[str, Shape]) -> None:
    if not any(key.partition(".")[2] in _NETWORK_SUFFIXES for key in shapes):
        names = ", ".join(ALGO_SUFFIXES)
        raise MeebsError(
            f"{path} is not a LoRA/LyCORIS network: none of its {len(shapes)} tensors is "
            f"a weight of {names} (hada_*, lokr_*, lora_down, ...)"
        )


def _check_sd1(path: Path, shapes: dict[str, Shape], metadata: dict[str, str]) -> None:
    """One layer under two prefixes, then SDXL keys or metadata."""
    check_one_prefix(path, shapes)
    sdxl = next((key for key in sorted(shapes) if key.startswith(_SDXL_PREFIXES)), None)
    if sdxl or metadata.get("ss_base_model_version", "").startswith("sdxl"):
        where = f"key {shown(sdxl)}" if sdxl else "ss_base_model_version"
        raise MeebsError(f"{path} is an SDXL network ({where}); meebs generates with SD 1.x")


def check_one_prefix(path: Path, shapes: dict[str, Shape]) -> None:
    """MeebsError if a text-encoder layer is there twice, as `lora_te_X` and `lora_te1_X`."""
    modules = {key.partition(".")[0] for key in shapes}
    twice = sorted(
        name
        for name in modules
        if name.startswith("lora_te1_") and TE_PREFIX + name.removeprefix("lora_te1_") in modules
    )
    if twice:
        single = TE_PREFIX + twice[0].removeprefix("lora_te1_")
        raise MeebsError(
            f"{path}: {shown(single)} and {shown(twice[0])} are the same text-encoder layer "
            f"under two prefixes ({len(twice)} layer(s) are there twice); ComfyUI would apply "
            "both: keep one prefix"
        )


def _check_dtypes(path: Path, dtypes: dict[str, str]) -> None:
    for key in sorted(dtypes):
        allowed = ALPHA_DTYPES if key.endswith(_NUMBER_SUFFIXES) else FLOAT_DTYPES
        if key.endswith(".on_input"):
            allowed = allowed | {"BOOL"}
        if dtypes[key] not in allowed:
            raise MeebsError(
                f"{path}: {shown(key)} is {dtypes[key]}; network weights must be F16, BF16, "
                "F32 or F64 (integer, bool and 8-bit values lack their scale and would be "
                "applied wrong): use the original file, not a quantized copy"
            )


def _check_module(path: Path, module: str, factors: dict[str, Shape]) -> None:
    """A module that lycoris and our merge can rebuild without guessing."""
    problem = module_problem(module, factors)
    if problem and problem.startswith("makes"):  # as where a model is (`misfit`)
        raise MeebsError(f"{path}: key {shown(module)}.* {problem}")
    if problem:
        raise MeebsError(f"{path}: {shown(module)}{problem}")


def module_problem(module: str, factors: dict[str, Shape]) -> str | None:
    """What is wrong with a module's tensors, from their shapes alone, as the end of a
    message that starts with the module's name; None if the factors rebuild a change
    without guessing. A module of another prefix (not lora_unet_/lora_te_) whose tensors
    are of no algorithm is left to the model check (`misfit`: no such layer)."""
    alpha = factors.get("alpha")
    if alpha is not None and math.prod(alpha) != 1:
        return f".alpha has shape {shape_text(alpha)}; an alpha is one number"
    weights = set(factors) - COMMON_SUFFIXES
    if not weights:
        if set(factors) == {"alpha"}:
            return " has an alpha and no weights: the file is incomplete"
        return f" has {' and '.join(sorted(factors))} and no weights: the file is incomplete"
    algos = module_algos(weights)
    if len(algos) > 1:
        return f" mixes {algos[0]} and {algos[1]} tensors: no loader reads both"
    own = ALGO_SUFFIXES[algos[0]] if algos else frozenset()
    unknown = sorted(weights - own)
    if unknown and (algos or module.startswith((UNET_PREFIX, TE_PREFIX))):
        kind = f"a {algos[0]}" if algos else "any LoRA/LyCORIS"
        return (
            f".{shown(unknown[0])}: not a tensor of {kind} module (lycoris-lora 4.1.3 "
            "writes none such; A1111 and ComfyUI would drop it without a word)"
        )
    if not algos:
        return None
    algo = algos[0]
    if "dora_scale" in factors and algo not in DORA_ALGOS:
        return f": dora_scale on a {algo} module: lycoris has no DoRA for {algo}"
    problem = _PROBLEMS[algo](factors)
    if problem is None and "dora_scale" in factors:
        problem = _dora_problem(factors)
    if problem is None:
        return None
    if problem.startswith("makes"):
        return problem + ": the file is damaged or converted wrongly"
    return f": {problem}: the file is damaged or converted wrongly"


def _loha_problem(f: dict[str, Shape]) -> str | None:
    """w_a [out, r] @ w_b [r, in·k·k], or with Tucker t [r, r, k, k], w_a [r, out], w_b [r, in]."""
    tucker = "hada_t1" in f or "hada_t2" in f
    problem = _missing_or_empty(f, LOHA_FACTORS + (("hada_t1", "hada_t2") if tucker else ()))
    if problem:
        return problem
    for i in (1, 2):
        a, b, t = f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}"
        if tucker and (len(f[t]) < 3 or f[t][:2] != (f[a][0], f[b][0])):
            return f"{_pair(f, t, a)} and {_pair(f, b)} do not join"
        if not tucker and f[a][1] != f[b][0]:
            return f"{_pair(f, a, b)} do not multiply"
    if f["hada_w1_b"][0] != f["hada_w2_b"][0]:
        return f"{_pair(f, 'hada_w1_b')} and {_pair(f, 'hada_w2_b')} differ in rank"
    first, second = delta_shape(f), delta_shape(_second_half(f))
    if first != second:
        return (
            f"makes a {change_text(first)} change with its first Hadamard pair and "
            f"{change_text(second)} with its second"
        )
    return None


def _second_half(f: dict[str, Shape]) -> dict[str, Shape]:
    """The w2 factors under w1 names, so `delta_shape` rebuilds the second product."""
    half = {"hada_w1_a": f["hada_w2_a"], "hada_w1_b": f["hada_w2_b"]}
    return {**half, "hada_t1": f["hada_t2"]} if "hada_t2" in f else half


def _lora_problem(f: dict[str, Shape]) -> str | None:
    """down [r, in] or [r, in, k, k], up [out, r] or [out, r, 1, 1], mid [r, r, k, k]."""
    problem = _missing_or_empty(f, LORA_FACTORS)
    if problem:
        return problem
    up, down, mid = f["lora_up.weight"], f["lora_down.weight"], f.get("lora_mid.weight")
    pair = _pair(f, "lora_up.weight", "lora_down.weight")
    if len(down) not in (2, 4) or len(up) != len(down) or any(size != 1 for size in up[2:]):
        return f"{pair} are not a Linear or a convolution pair"
    if mid is None and up[1] != down[0]:
        return f"{pair} do not multiply"
    if mid is not None and (len(mid) != 4 or mid[:2] != (up[1], down[0]) or down[2:] != (1, 1)):
        return f"{_pair(f, 'lora_mid.weight')} does not join {pair}"
    return None


def _lokr_problem(f: dict[str, Shape]) -> str | None:
    """Half i is lokr_w{i}, or lokr_w{i}_a [·, r] @ lokr_w{i}_b [r, ·]; the second half may
    be a conv's [b, d, k, k], or Tucker: lokr_t2 [r, r, k, k], w2_a [r, b], w2_b [r, d]."""
    for i in (1, 2):
        whole, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
        if whole in f and (a in f or b in f):
            return f"it has both {whole} and {a if a in f else b}: a half is one or the other"
        if whole not in f and a not in f and b not in f:
            return f"lokr_w{i} (or lokr_w{i}_a and lokr_w{i}_b) missing"
        names = (whole,) if whole in f else (a, b)
        problem = _missing_or_empty(f, names, matrices=names if i == 1 or whole not in f else ())
        if problem:
            return problem
    if "lokr_t2" in f and "lokr_w2" in f:
        return "lokr_t2 belongs to lokr_w2_a and lokr_w2_b, not to lokr_w2"
    if "lokr_w2" in f and len(f["lokr_w2"]) < 2:
        return f"{_pair(f, 'lokr_w2')} is not a matrix or a kernel"
    if "lokr_w1_a" in f and f["lokr_w1_a"][1] != f["lokr_w1_b"][0]:
        return f"{_pair(f, 'lokr_w1_a', 'lokr_w1_b')} do not multiply"
    if "lokr_t2" in f:
        t2 = f["lokr_t2"]
        if 0 in t2 or len(t2) < 3 or t2[:2] != (f["lokr_w2_a"][0], f["lokr_w2_b"][0]):
            return f"{_pair(f, 'lokr_t2', 'lokr_w2_a')} and {_pair(f, 'lokr_w2_b')} do not join"
    elif "lokr_w2_a" in f and f["lokr_w2_a"][1] != f["lokr_w2_b"][0]:
        return f"{_pair(f, 'lokr_w2_a', 'lokr_w2_b')} do not multiply"
    if "lokr_w1_b" in f and "lokr_w2_b" in f and f["lokr_w1_b"][0] != f["lokr_w2_b"][0]:
        return f"{_pair(f, 'lokr_w1_b')} and {_pair(f, 'lokr_w2_b')} differ in rank"
    return None


def _glora_problem(f: dict[str, Shape]) -> str | None:
    """lycoris' layout: a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(, k, k)]; a conv's
    a1, a2 and b1 are 1x1 kernels. (The older layout, b2 @ b1 + W @ a2 @ a1, is refused.)"""
    problem = _missing_or_empty(f, GLORA_FACTORS)
    if problem:
        return problem
    a1, a2, b1, b2 = (f[name] for name in GLORA_FACTORS)
    everything = _pair(f, *GLORA_FACTORS)
    if len(b2) not in (2, 4) or any(len(x) != len(b2) or set(x[2:]) - {1} for x in (a1, a2, b1)):
        return f"{everything} are not a Linear's or a convolution's factors"
    rank = a2[0]
    if (a1[1], b1[1], b2[0]) != (rank, rank, rank) or (a1[0], a2[1]) != (b2[1], b2[1]):
        return f"{everything} do not join as a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in]"
    return None


def _oft_problem(f: dict[str, Shape]) -> str | None:
    """oft_blocks [n, s, s]; rescale one number per output (n·s), [n·s, 1, ...]."""
    problem = _missing_or_empty(f, ("oft_blocks",))
    if problem:
        return problem
    blocks = f["oft_blocks"]
    if len(blocks) != 3 or blocks[1] != blocks[2]:
        return f"{_pair(f, 'oft_blocks')} is not a stack of square blocks (BOFT is not read)"
    rescale = f.get("rescale")
    out = blocks[0] * blocks[1]
    if rescale is not None and (not rescale or rescale[0] != out or set(rescale[1:]) - {1}):
        return f"{_pair(f, 'rescale')} is not one number per output ({out})"
    return None


def _full_problem(f: dict[str, Shape]) -> str | None:
    """diff: the layer's own shape; diff_b [out]: its bias."""
    problem = _missing_or_empty(f, ("diff",))
    if problem:
        return problem
    diff, bias = f["diff"], f.get("diff_b")
    if len(diff) < 2:
        return f"{_pair(f, 'diff')} is not a layer's weight"
    if bias is not None and bias != diff[:1]:
        return f"{_pair(f, 'diff_b')} is not the bias of {_pair(f, 'diff')}"
    return None


def _ia3_problem(f: dict[str, Shape]) -> str | None:
    """weight [n] (a Linear) or [1, n, 1, 1] (a conv); on_input, one number, picks the axis."""
    problem = _missing_or_empty(f, ("weight",))
    if problem:
        return problem
    if "on_input" not in f:
        return "on_input missing"
    if math.prod(f["on_input"]) != 1:
        return f"{_pair(f, 'on_input')} is not one number"
    weight = f["weight"]
    if len(weight) != 1 and (len(weight) < 3 or weight[0] != 1 or set(weight[2:]) - {1}):
        return f"{_pair(f, 'weight')} is not one number per channel"
    return None


def _dora_problem(f: dict[str, Shape]) -> str | None:
    """dora_scale: [out, 1, ...] (lycoris' `wd_on_out`) or [1, in, ...], of the change's rank."""
    dora, have = f["dora_scale"], delta_shape(f)
    one_axis = len(dora) >= 2 and 0 not in dora and not set(dora[2:]) - {1} and 1 in dora[:2]
    if not one_axis or have is None or (dora[1] == 1 and dora[0] != have[0]):
        return f"{_pair(f, 'dora_scale')} is not one number per output or input of its change"
    return None


_PROBLEMS = {
    "LoHA": _loha_problem,
    "LoRA/LoCon": _lora_problem,
    "LoKr": _lokr_problem,
    "GLoRA": _glora_problem,
    "Diag-OFT": _oft_problem,
    "Full": _full_problem,
    "IA3": _ia3_problem,
}
# Keys that make a file a network: any algorithm's tensor but IA3's `weight`, which a
# checkpoint has too (IA3 is told by its `on_input`, as lycoris tells it).
_NETWORK_SUFFIXES = frozenset().union(*ALGO_SUFFIXES.values()) - {"weight"}


def _missing_or_empty(
    f: dict[str, Shape], names: tuple[str, ...], matrices: tuple[str, ...] | None = None
) -> str | None:
    """The first factor missing, without a size, empty, or not a matrix (`matrices`; by
    default the `hada_w*` and `lokr_w*_a/b` factors)."""
    missing = [name for name in names if name not in f]
    if missing:
        return f"{', '.join(missing)} missing"
    if matrices is None:
        matrices = tuple(n for n in names if n.startswith(("hada_w", "lokr_w1", "lokr_w2_")))
    for name in names:
        if not f[name] or 0 in f[name]:
            return f"{_pair(f, name)} is empty or a single number, not a factor"
        if name in matrices and len(f[name]) != 2:
            return f"{_pair(f, name)} is not a matrix"
    return None


def _pair(f: dict[str, Shape], *names: str) -> str:
    """`hada_w1_a [64, 4] @ hada_w1_b [4, 32]`-style factors with their shapes."""
    return " @ ".join(f"{name} {shape_text(f[name])}" for name in names)
