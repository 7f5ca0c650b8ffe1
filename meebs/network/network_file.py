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
  (an alpha may be an integer: kohya writes `torch.tensor(dim)` when alpha = dim);
* a LoHA or LoRA module whose factors are missing, empty or do not multiply: lycoris'
  `copy_` broadcasts a [out, 1] factor onto [out, rank] without a word;
* a NaN or inf anywhere, or factors whose change overflows float32: black or noise
  (`check_finite`).

Whether a module fits a layer of a given model is checked where the model is: `misfit`
says what change the factors rebuild, from the header alone, and why it does not fit.
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
# Tensor-name markers of each algorithm, as kohya and LyCORIS write them.
ALGO_MARKERS = {"hada_": "LoHA", "lokr_": "LoKr", "lora_down": "LoRA/LoCon"}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
ALPHA_DTYPES = FLOAT_DTYPES | {"I8", "I16", "I32", "I64", "U8"}
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LORA_FACTORS = ("lora_up.weight", "lora_down.weight")
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
    sums rank (Tucker: rank x rank) terms; LoHA multiplies two products; then alpha / rank."""

    def peak(name: str) -> float:
        return f[name][0] if name in f else 0.0

    if "hada_w1_b" in f and "hada_w2_b" in f:
        rank = max(1, (f["hada_w1_b"][1] or (1,))[0])
        change = 1.0
        for i in (1, 2):
            core = rank * peak(f"hada_t{i}") if f"hada_t{i}" in f else 1.0
            change *= rank * core * peak(f"hada_w{i}_a") * peak(f"hada_w{i}_b")
    elif "lora_down.weight" in f:
        rank = max(1, (f["lora_down.weight"][1] or (1,))[0])
        core = rank * peak("lora_mid.weight") if "lora_mid.weight" in f else 1.0
        change = rank * core * peak("lora_up.weight") * peak("lora_down.weight")
    else:
        return 0.0
    return change * (peak("alpha") if "alpha" in f else rank) / rank


def with_implied_alphas(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors, plus `alpha` = rank (a scale of 1) for each LoHA or LoRA module that
    has none: how A1111, ComfyUI and our merge read a missing alpha; lycoris' loader
    cannot build such a module (`float(None)`)."""
    result = dict(tensors)
    for module, factors in modules_of({k: tuple(v.shape) for k, v in tensors.items()}).items():
        rank = next((factors[s][0] for s in ("hada_w1_b", "lora_down.weight") if s in factors), 0)
        if rank and "alpha" not in factors:
            result[f"{module}.alpha"] = torch.tensor(float(rank))
    return result


def modules_of(by_key: dict[str, V]) -> dict[str, dict[str, V]]:
    """{module: {suffix: value}}: `lora_unet_x.lora_up.weight` is module `lora_unet_x`."""
    modules: dict[str, dict[str, V]] = {}
    for key, value in by_key.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = value
    return modules


def delta_shape(factors: dict[str, Shape]) -> Shape | None:
    """The shape of the weight change a checked LoHA/LoRA module's factors rebuild:
    [out, in·k·k] for plain LoHA (lycoris' layout), the layer's own shape otherwise;
    None for another algorithm."""
    if "hada_t1" in factors:
        return (factors["hada_w1_a"][1], factors["hada_w1_b"][1], *factors["hada_t1"][2:])
    if "hada_w1_a" in factors:
        return factors["hada_w1_a"][0], factors["hada_w1_b"][1]
    if "lora_mid.weight" in factors:
        up, down = factors["lora_up.weight"], factors["lora_down.weight"]
        return (up[0], down[1], *factors["lora_mid.weight"][2:])
    if "lora_up.weight" in factors:
        return (factors["lora_up.weight"][0], *factors["lora_down.weight"][1:])
    return None


def misfit(module: str, factors: dict[str, Shape], layer: Shape) -> tuple[Shape, str] | None:
    """(the change the factors rebuild, why it cannot go on a layer whose weight is
    `layer`); None if it fits or cannot be told from shapes (another algorithm)."""
    have = delta_shape(factors)
    if have is None:
        return None
    want = _flat(layer) if "hada_w1_a" in factors and "hada_t1" not in factors else tuple(layer)
    if have == want:
        return None
    if _flat(have) == _flat(want)[::-1]:
        why = "its factors are transposed; A1111 would reshape them into a wrong image"
    elif _SD2_WIDTH in have and ("attn2_to_k" in module or "attn2_to_v" in module):
        why = "an SD 2.x network: its cross-attention reads a 1024-wide text context"
    elif _SD2_WIDTH in have and module.startswith(TE_PREFIX):
        why = "an SD 2.x network: its text encoder is 1024 wide"
    else:
        why = "a network for another model size?"
    return have, why


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
    if not any(marker in key for key in shapes for marker in ALGO_MARKERS):
        raise MeebsError(
            f"{path} is not a LoRA/LyCORIS network: none of its {len(shapes)} tensors is "
            f"a {'/'.join(ALGO_MARKERS)}* weight"
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
        allowed = ALPHA_DTYPES if key.endswith(".alpha") else FLOAT_DTYPES
        if dtypes[key] not in allowed:
            raise MeebsError(
                f"{path}: {shown(key)} is {dtypes[key]}; network weights must be F16, BF16, "
                "F32 or F64 (integer, bool and 8-bit values lack their scale and would be "
                "applied wrong): use the original file, not a quantized copy"
            )


def _check_module(path: Path, module: str, factors: dict[str, Shape]) -> None:
    """A LoHA or LoRA module that lycoris and our merge can rebuild without guessing."""
    where = f"{path}: {shown(module)}"
    alpha = factors.get("alpha")
    if alpha is not None and math.prod(alpha) != 1:
        raise MeebsError(f"{where}.alpha has shape {shape_text(alpha)}; an alpha is one number")
    if not set(factors) - {"alpha"}:
        raise MeebsError(f"{where} has an alpha and no weights: the file is incomplete")
    if any(suffix.startswith("hada_") for suffix in factors):
        problem = _loha_problem(factors)
    elif any(suffix in factors for suffix in LORA_FACTORS):
        problem = _lora_problem(factors)
    else:
        return
    if problem:  # "key X.* makes a 64x32 change..." as where a model is (`misfit`)
        subject = f"{path}: key {shown(module)}.*" if problem.startswith("makes") else where + ":"
        raise MeebsError(f"{subject} {problem}: the file is damaged or converted wrongly")


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


def _missing_or_empty(f: dict[str, Shape], names: tuple[str, ...]) -> str | None:
    """The first factor missing, without a size, empty, or (`hada_w*`) not a matrix."""
    missing = [name for name in names if name not in f]
    if missing:
        return f"{', '.join(missing)} missing"
    for name in names:
        if not f[name] or 0 in f[name]:
            return f"{_pair(f, name)} is empty or a single number, not a factor"
        if name.startswith("hada_w") and len(f[name]) != 2:
            return f"{_pair(f, name)} is not a matrix"
    return None


def _pair(f: dict[str, Shape], *names: str) -> str:
    """`hada_w1_a [64, 4] @ hada_w1_b [4, 32]`-style factors with their shapes."""
    return " @ ".join(f"{name} {shape_text(f[name])}" for name in names)
