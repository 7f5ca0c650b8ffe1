"""The weight change one network module makes, computed from its saved tensors alone.

Written from the formulas the loaders use (REFERENCE §4 and §6), not from lycoris, whose
`merge_to` scales LoHA deltas by (alpha/rank) twice (REFERENCE §9). Maths runs in fp32
whatever the file's dtype, as ComfyUI does, so an fp16 file merges without extra error.

    LoHA        dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
    LoHA Tucker dW = rebuild(t1, w1_a, w1_b) * rebuild(t2, w2_a, w2_b) * alpha / rank
    LoRA/LoCon  dW = up @ down * alpha / rank     (Tucker: rebuild(mid, up, down))

rank is `hada_w1_b.shape[0]` / `lora_down.weight.shape[0]`; no alpha means scale 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meebs.errors import MeebsError
from meebs.network.network_file import LOHA_FACTORS, LORA_FACTORS, misfit, shape_text

# The tensor that says a module key belongs to a network we know how to merge.
MARKERS = ("hada_w1_a", "lora_down.weight")


def module_delta(module_key: str, tensors: dict[str, Tensor], shape: torch.Size) -> Tensor:
    """dW for the layer `module_key`, whose weight has `shape`; `tensors` are keyed by suffix.

    A module whose factors do not rebuild `shape` is a MeebsError naming key and shapes,
    found from the shapes before any product is computed: a 256 KiB file whose factors
    are [65536, 1] and [1, 65536] would otherwise allocate a 16 GiB delta. A product of
    the right element count in another layout (transposed factors) is refused, never
    reshaped, unlike A1111.
    """
    _check_fit(module_key, tensors, shape)
    fp32 = {suffix: tensor.float() for suffix, tensor in tensors.items()}
    if "hada_w1_a" in fp32:
        delta, rank = _loha(module_key, fp32), fp32["hada_w1_b"].shape[0]
    elif "lora_down.weight" in fp32:
        delta, rank = _lora(module_key, fp32), fp32["lora_down.weight"].shape[0]
    else:
        raise MeebsError(
            f"{module_key}: unsupported network module ({', '.join(sorted(tensors))}); "
            "only LoHA, LoCon and LoRA can be merged"
        )
    alpha = fp32.get("alpha")
    scale = 1.0 if alpha is None else alpha.item() / rank
    delta = delta.reshape(shape) * scale
    if not torch.isfinite(delta).all():
        raise MeebsError(
            f"{module_key}: its change overflows to inf (factors up to "
            f"{max(t.abs().max().item() for t in fp32.values()):.3g}); a merged checkpoint "
            "would draw black: the file is damaged"
        )
    return delta


def _check_fit(module_key: str, tensors: dict[str, Tensor], shape: torch.Size) -> None:
    factors = {suffix: tuple(tensor.shape) for suffix, tensor in tensors.items()}
    if "hada_w1_a" in factors:
        _require(module_key, tensors, LOHA_FACTORS)
    elif "lora_down.weight" in factors:
        _require(module_key, tensors, LORA_FACTORS)
    problem = misfit(module_key, factors, tuple(shape))
    if problem:
        have, why = problem
        raise MeebsError(
            f"{module_key}: its factors rebuild a {shape_text(have)} delta, the layer's "
            f"weight is {list(shape)} ({why})"
        )


def _loha(module_key: str, t: dict[str, Tensor]) -> Tensor:
    _require(module_key, t, LOHA_FACTORS)
    if "hada_t1" in t:
        _require(module_key, t, ("hada_t2",))
        first = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        second = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        first = _matmul(module_key, t["hada_w1_a"], t["hada_w1_b"])
        second = _matmul(module_key, t["hada_w2_a"], t["hada_w2_b"])
    if first.shape != second.shape:
        raise MeebsError(
            f"{module_key}: its two Hadamard factors rebuild {list(first.shape)} and "
            f"{list(second.shape)}: the file is damaged"
        )
    return first * second


def _lora(module_key: str, t: dict[str, Tensor]) -> Tensor:
    """up [out, r(,1,1)] and down [r, in(,k,k)]; a conv's k x k lives in down, or in mid."""
    _require(module_key, t, LORA_FACTORS)
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    up = up.reshape(up.shape[0], -1)
    if "lora_mid.weight" in t:
        return _tucker(t["lora_mid.weight"], up.T, down.reshape(down.shape[0], -1))
    return _matmul(module_key, up, down.reshape(down.shape[0], -1))


def _tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker rebuild: core [r, r, k, k], wa [r, out], wb [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, wa, wb.reshape(wb.shape[0], -1))


def _matmul(module_key: str, a: Tensor, b: Tensor) -> Tensor:
    if a.shape[-1] != b.shape[0]:
        raise MeebsError(
            f"{module_key}: factors {list(a.shape)} @ {list(b.shape)} do not multiply: "
            "the file is damaged"
        )
    return a @ b


def _require(module_key: str, tensors: dict[str, Tensor], suffixes: tuple[str, ...]) -> None:
    missing = [suffix for suffix in suffixes if suffix not in tensors]
    if missing:
        raise MeebsError(f"{module_key}: the network file lacks {', '.join(missing)}")
