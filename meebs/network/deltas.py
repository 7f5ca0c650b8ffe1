"""The weight change one network module makes, from its saved tensors (and, where the
algorithm says so, the layer's own weight W).

Written from the formulas the loaders use (A1111's extensions-builtin/Lora/network_*.py,
ComfyUI's comfy/weight_adapter/*.py; REFERENCE §4 and §6), and tested against lycoris-lora
4.1.3's own forward (tests/test_algo_files.py), not its `get_diff_weight`/`merge_to`,
which scale LoHA and LoKr deltas by (alpha/rank) twice (REFERENCE §9). Maths runs in fp32
whatever the file's dtype, as ComfyUI does, so an fp16 file merges without extra error.

    algo         dW                                                           needs W
    LoHA         (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r                    no
    LoHA Tucker  rebuild(t1, w1_a, w1_b) * rebuild(t2, w2_a, w2_b) * alpha/r  no
    LoRA/LoCon   up @ down * alpha / r (Tucker: rebuild(mid, up, down))       no
    LoKr         kron(W1, W2) * s; W1 = w1 or w1_a @ w1_b;                    no
                 W2 = w2, w2_a @ w2_b or rebuild(t2, w2_a, w2_b);
                 s = alpha / r when a half is factored, 1 when both are whole
    GLoRA        (b1 @ b2 + W @ a1 @ a2) * alpha / r, r = a2.shape[0]         yes
    Diag-OFT     rescale * (R W) - W; R = blockdiag((I + Q)(I - Q)^-1) turns  yes
                 the outputs, Q = B - Bᵀ of oft_blocks B, scaled down to norm
                 alpha * out when alpha > 0 and ‖Q‖ is larger
    Full         diff (and the bias: diff_b, `bias_delta`)                    no
    IA3          W * weight, one number per output (per input: on_input)      yes
    DoRA         W' - W, W' = (W + dW) * dora_scale / ‖W + dW‖, the norm per  yes
                 output row (dora_scale [out, 1, ...], lycoris' `wd_on_out`)
                 or per input column ([1, in, ...])

rebuild(t, a, b) = einsum("i j ..., i p, j r -> p r ...", t, a, b). r is the rank:
`hada_w1_b.shape[0]`, `lora_down.weight.shape[0]`, LoKr's `lokr_w2_b.shape[0]` (or
`lokr_w1_b`'s), as A1111 and ComfyUI read it; no alpha means scale 1 (Diag-OFT: no
constraint). `use_scalar` leaves nothing in the file: lycoris multiplies its scalar into
w1_a / up / lokr_w1 (GLoRA: a2 and b2) when it saves.

Where the loaders disagree, lycoris (the trainer, whose forward the tests compare with)
decides: Diag-OFT's constraint is alpha * out (A1111: the same, but alpha 0 clamps Q to
nothing; ComfyUI: alpha alone) and its `rescale` is applied (both loaders ignore it); a
DoRA magnitude of shape [out, 1] is per output, lycoris' default (A1111 and older ComfyUI
norm per input whatever the shape, so they misapply it; meebs trains [1, in], per input,
which all of them apply alike); GLoRA is lycoris' current layout (A1111 reads the older one, and
without alpha / r).

A change that depends on W is computed from the weight the caller passes as `base`: the
layer's weight as it is before this network is added (after any network merged before
it), as ComfyUI patches one network over another. At a merge weight m the caller adds
m x dW, ComfyUI's reading of a strength (lycoris interpolates DoRA's scale instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from meebs.errors import MeebsError
from meebs.network.algo_problems import module_problem
from meebs.network.algo_tensors import (
    GLORA_FACTORS,
    dora_on_output,
    misfit,
    module_algo,
    module_rank,
    needs_base,
    shape_text,
)

# A key ending in one of these belongs to a network module we know how to merge.
MARKERS = (
    ".hada_w1_a",
    ".lora_down.weight",
    ".lokr_w1",
    ".lokr_w1_a",
    ".a1.weight",
    ".oft_blocks",
    ".diff",
    ".on_input",
)


def module_delta(
    module_key: str, tensors: dict[str, Tensor], shape: torch.Size, base: Tensor | None = None
) -> Tensor:
    """dW for the layer `module_key`, whose weight has `shape`; `tensors` are keyed by suffix.

    `base` is the layer's weight (any dtype, read in fp32); it must be given where the
    change depends on it (`needs_base`: GLoRA, Diag-OFT, IA3, DoRA) and is not read
    otherwise.

    A module whose factors do not rebuild `shape` is a MeebsError naming key and shapes,
    found from the shapes before any product is computed: a 256 KiB file whose factors
    are [65536, 1] and [1, 65536] would otherwise allocate a 16 GiB delta. A product of
    the right element count in another layout (transposed factors) is refused, never
    reshaped, unlike A1111.
    """
    shape = torch.Size(shape)
    algo = _check_fit(module_key, tensors, shape)
    if needs_base(tensors):
        if base is None:
            raise MeebsError(
                f"{module_key}: its {_kind(tensors, algo)} change is computed from the "
                "layer's weight, and none was given"
            )
        if tuple(base.shape) != tuple(shape):
            raise MeebsError(
                f"{module_key}: the layer's weight is {list(base.shape)}, not {list(shape)}"
            )
    fp32 = {suffix: tensor.float() for suffix, tensor in tensors.items()}
    weight = base.float() if base is not None and needs_base(tensors) else None
    try:
        delta = _ALGOS[algo](fp32, shape, weight).reshape(shape)
    except MeebsError as error:  # what only the values can show (IA3's on_input)
        raise MeebsError(f"{module_key}: {error}") from None
    if "dora_scale" in fp32 and weight is not None:
        delta = _dora(delta, weight, fp32["dora_scale"])
    if not torch.isfinite(delta).all():
        raise MeebsError(
            f"{module_key}: its change overflows to inf (factors up to "
            f"{max(t.abs().max().item() for t in fp32.values() if t.numel()):.3g}); a "
            "merged checkpoint would draw black: the file is damaged"
        )
    return delta


def bias_delta(
    module_key: str, tensors: dict[str, Tensor], bias: torch.Size | None
) -> Tensor | None:
    """The change of the layer's bias (a Full module's `diff_b`, fp32), or None when the
    module changes no bias; `bias` is the layer's bias shape, None if it has none."""
    diff_b = tensors.get("diff_b")
    if diff_b is None:
        return None
    if bias is None:
        raise MeebsError(f"{module_key}: its diff_b changes a bias this layer does not have")
    if tuple(diff_b.shape) != tuple(bias):
        raise MeebsError(
            f"{module_key}: its diff_b is {list(diff_b.shape)}, the layer's bias {list(bias)}"
        )
    return diff_b.float()


def _kind(tensors: dict[str, Tensor], algo: str) -> str:
    return f"{algo} + DoRA" if "dora_scale" in tensors else algo


def _check_fit(module_key: str, tensors: dict[str, Tensor], shape: torch.Size) -> str:
    """The module's algorithm, once its shapes are right and rebuild `shape`."""
    factors = {suffix: tuple(tensor.shape) for suffix, tensor in tensors.items()}
    problem = module_problem(module_key, factors)
    if problem:
        separator = " " if problem.startswith("makes") else ""
        raise MeebsError(f"{module_key}{separator}{problem}")
    algo = module_algo(factors)
    if algo is None:
        raise MeebsError(
            f"{module_key}: unsupported network module ({', '.join(sorted(tensors))}); "
            "only LoHA, LoCon/LoRA, LoKr, GLoRA, Diag-OFT, Full and IA3 can be merged"
        )
    fit = misfit(module_key, factors, tuple(shape))
    if fit:
        have, why = fit
        raise MeebsError(
            f"{module_key}: its factors rebuild a {shape_text(have)} delta, the layer's "
            f"weight is {list(shape)} ({why})"
        )
    return algo


def _scale(t: dict[str, Tensor], rank: int | None) -> float:
    """alpha / rank; 1 without an alpha."""
    alpha = t.get("alpha")
    return 1.0 if alpha is None or not rank else alpha.item() / rank


def _rank(t: dict[str, Tensor]) -> int | None:
    return module_rank({suffix: tuple(tensor.shape) for suffix, tensor in t.items()})


def _loha(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    if "hada_t1" in t:
        first = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        second = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        first = t["hada_w1_a"] @ t["hada_w1_b"]
        second = t["hada_w2_a"] @ t["hada_w2_b"]
    return first * second * _scale(t, _rank(t))


def _lora(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    """up [out, r(,1,1)] and down [r, in(,k,k)]; a conv's k x k lives in down, or in mid."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    up = up.reshape(up.shape[0], -1)
    if "lora_mid.weight" in t:
        delta = _tucker(t["lora_mid.weight"], up.T, down.reshape(down.shape[0], -1))
    else:
        delta = up @ down.reshape(down.shape[0], -1)
    return delta * _scale(t, _rank(t))


def _lokr(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    """kron(W1, W2): a conv's k x k lives in W2 (or in W2's columns, as d·k·k)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    w1 = w1.reshape(*w1.shape, *(1,) * (w2.dim() - w1.dim()))
    whole = "lokr_w1" in t and "lokr_w2" in t
    return torch.kron(w1, w2.contiguous()) * (1.0 if whole else _scale(t, _rank(t)))


def _glora(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    """b1 [out, r] @ b2 [r, in·k·k] + W @ a1 [in, r] @ a2 [r, in] (on W's input axis)."""
    assert base is not None
    a1, a2, b1, b2 = (t[name].flatten(1) for name in GLORA_FACTORS)
    through_a = torch.einsum("o i ..., i j -> o j ...", base, a1)
    through_a = torch.einsum("o i ..., i j -> o j ...", through_a, a2)
    return ((b1 @ b2).reshape(shape) + through_a) * _scale(t, _rank(t))


def _oft(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    """Each block of `size` output rows of W turned by its Cayley rotation R."""
    assert base is not None
    blocks = t["oft_blocks"]
    count, size, _ = blocks.shape
    skew = blocks - blocks.transpose(1, 2)
    alpha = t.get("alpha")
    constraint = (0.0 if alpha is None else alpha.item()) * shape[0]
    if constraint > 0:
        norm = torch.linalg.norm(skew) + 1e-8
        if norm > constraint:
            skew = skew * constraint / norm
    eye = torch.eye(size)
    rotation = (eye + skew) @ torch.linalg.inv(eye - skew)
    rows = base.reshape(count, size, *shape[1:])
    turned = torch.einsum("k n m, k n ... -> k m ...", rotation, rows).reshape(shape)
    if "rescale" in t:
        turned = t["rescale"] * turned
    return turned - base


def _full(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    return t["diff"]


def _ia3(t: dict[str, Tensor], shape: torch.Size, base: Tensor | None) -> Tensor:
    """W scaled per output row (per input column when `on_input` is not 0)."""
    assert base is not None
    on_input = bool(t["on_input"].item())
    axis = 1 if on_input else 0
    weight = t["weight"].flatten()
    if weight.numel() != shape[axis]:
        side = "inputs" if on_input else "outputs"
        raise MeebsError(
            f"its IA3 weight has {weight.numel()} numbers for the layer's {shape[axis]} {side} "
            f"(on_input {int(on_input)})"
        )
    view = [1] * len(shape)
    view[axis] = weight.numel()
    return base * weight.reshape(view)


def _dora(delta: Tensor, base: Tensor, magnitude: Tensor) -> Tensor:
    """W' - W, W' = (W + dW) scaled so each output row (magnitude [out, 1, ...]) or input
    column ([1, in, ...]) has the stored norm, as lycoris' `weight_decompose` does."""
    merged = base + delta
    eps = torch.finfo(torch.float32).eps
    if dora_on_output(tuple(magnitude.shape), tuple(merged.shape)):
        norm = merged.flatten(1).norm(dim=1).reshape(magnitude.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(magnitude.shape)
    return merged * (magnitude / (norm + eps)) - base


def _tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker rebuild: core [r, r, k, k], wa [r, out], wb [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, wa, wb.reshape(wb.shape[0], -1))


_ALGOS = {
    "LoHA": _loha,
    "LoRA/LoCon": _lora,
    "LoKr": _lokr,
    "GLoRA": _glora,
    "Diag-OFT": _oft,
    "Full": _full,
    "IA3": _ia3,
}
