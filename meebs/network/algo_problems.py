"""What is wrong with a module's tensors, told from a network file's header alone.

A module with a factor missing or empty, or factors that do not multiply, is one that
lycoris loads without a word (its `copy_` broadcasts a [out, 1] factor onto [out, rank])
and A1111 or ComfyUI apply wrongly; each algorithm's rule here says what its factors
must be, in lycoris-lora 4.1.3's layout (`algo_tensors`), so `network_file` refuses it.
"""

from __future__ import annotations

import math

from meebs.files.safetensors_io import shown
from meebs.network.algo_tensors import (
    ALGO_SUFFIXES,
    COMMON_SUFFIXES,
    DORA_ALGOS,
    GLORA_FACTORS,
    LOHA_FACTORS,
    LORA_FACTORS,
    TE_PREFIX,
    UNET_PREFIX,
    Shape,
    change_text,
    delta_shape,
    module_algos,
    shape_text,
)


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
