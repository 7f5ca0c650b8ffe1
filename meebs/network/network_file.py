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
  (the tensors of each, by lycoris-lora 4.1.3's names: `algo_tensors.ALGO_SUFFIXES`;
  what each must be: `algo_problems`);
* a NaN or inf anywhere, or factors whose change overflows float32: black or noise
  (`check_finite`).

Whether a module fits a layer of a given model is checked where the model is
(`algo_tensors.misfit`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from meebs.errors import MeebsError
from meebs.files.safetensors_io import read_header, shown
from meebs.network.algo_problems import module_problem
from meebs.network.algo_tensors import (
    ALGO_SUFFIXES,
    ALPHA_ALGOS,
    TE_PREFIX,
    Shape,
    change_bound,
    module_algo,
    module_rank,
    modules_of,
)

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
ALPHA_DTYPES = FLOAT_DTYPES | {"I8", "I16", "I32", "I64", "U8"}
# One-number tensors that may be integers: lycoris keeps IA3's `on_input` as an int64.
_NUMBER_SUFFIXES = (".alpha", ".on_input")
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_")
# The largest weight change a module may rebuild: float32 ends at 3.4e38.
MAX_CHANGE = 1e37
# Keys that make a file a network: any algorithm's tensor but IA3's `weight`, which a
# checkpoint has too (IA3 is told by its `on_input`, as lycoris tells it).
_NETWORK_SUFFIXES = frozenset().union(*ALGO_SUFFIXES.values()) - {"weight"}


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
        bound = change_bound(factors)
        if bound > MAX_CHANGE:
            largest = max(peak for peak, _ in factors.values())
            raise MeebsError(
                f"{path}: {shown(module)}: its factors (up to {largest:.3g}) rebuild a change "
                f"of up to {bound:.3g}, past float32: it would draw black; the file is damaged"
            )


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


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())
