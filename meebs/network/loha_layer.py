"""Faster LoHA layers for training: the same function as lycoris' `LohaModule`, less work.

lycoris-lora 4.1.3 computes a LoHA layer as `op(x, W) + op(x, (W + m*dW) - W)`: two full
convolutions or matmuls, and two full-size weight temporaries per layer (REFERENCE §10).
Here the layer is one op on the effective weight `W + m*dW`:

* "fast": `dW = (w1a @ w1b) * (w2a @ w2b) * scale` is built in-place inside a custom
  autograd function that saves only the small factors and rebuilds the two products in
  its backward; autograd's own `op` then keeps the effective weight for the input gradient.
* "low-memory": the whole layer is one autograd function that saves the input and the
  factors only; the backward rebuilds the effective weight (and, once more, the two
  products) instead of keeping a full-size weight per layer alive between forward and
  backward, so peak memory approaches the frozen weights alone.
* "factored": never builds a full-size weight: the change goes through its exact rank
  r1*r2 factors (meebs.network.loha_factored), layer by layer where that is cheaper,
  "fast" elsewhere.
* "lycoris": lycoris' own forward, kept as the reference the others are tested against.

lycoris stays in charge of what it does well: the modules, their parameters, names,
initialisation and the file format. Only the org module's forward is redirected, and a
module that uses a feature this path does not implement (DoRA, rank/module dropout,
bypass mode, a trained scalar) keeps lycoris' forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from lycoris.modules.base import LycorisBaseModule
from lycoris.modules.loha import LohaModule
from torch import Tensor, nn

from meebs.network.loha_factored import factored_forward, factored_pays

LAYER_PATHS = ("factored", "fast", "low-memory", "lycoris")

_TUCKER_REBUILD = "i j ..., j r, i p -> p r ..."


def use_layer_path(loras: Sequence[nn.Module], path: str) -> dict[str, int]:
    """Route every LoHA module in `loras` through `path`; returns how many layers each
    path now computes (`layer_paths`).

    Call after lycoris has applied the network (its `apply_to` sets the org modules'
    forward); calling again with another path switches back and forth. Modules of the
    other algorithms keep the forward lycoris gave them and count as "lycoris".
    """
    _check(path)
    for lora in loras:
        taken = layer_path(lora, path)
        if taken is not None and isinstance(lora, LohaModule):
            route(lora, taken)
    return layer_paths(loras, path)


def route(lora: LohaModule, path: str) -> None:
    """Compute `lora`'s layer through `path`, whatever `layer_path` would choose."""
    _check(path)
    org = lora.org_module[0]
    org.forward = lora.forward if path == "lycoris" else functools.partial(_forward, lora, path)


def layer_paths(loras: Sequence[nn.Module], path: str) -> dict[str, int]:
    """How many layers each path computes when the recipe asks for `path` (`plan`)."""
    _check(path)
    taken = [layer_path(lora, path) for lora in loras]
    return {name: taken.count(name) for name in LAYER_PATHS if name in taken}


def layer_path(lora: nn.Module, path: str) -> str | None:
    """The path that computes `lora`'s layer: `path`, except that "factored" takes a
    layer only where `factored_pays` ("fast" elsewhere), and that a LoHA module using a
    feature only lycoris implements (DoRA, a trained scalar...) and every module of
    another algorithm (LoKr, LoCon, (IA)^3...) keep lycoris' own forward; None for
    anything that is no lycoris module of a supported layer."""
    _check(path)
    if not isinstance(lora, LycorisBaseModule) or lora.not_supported:
        return None
    if not isinstance(lora, LohaModule) or not _supported(lora):
        return "lycoris"
    if path == "factored" and not factored_pays(lora):
        return "fast"
    return path


def _check(path: str) -> None:
    if path not in LAYER_PATHS:
        raise ValueError(f"LoHA layer path {path!r} is not one of {', '.join(LAYER_PATHS)}")


def _supported(lora: LohaModule) -> bool:
    """Features of LohaModule that only lycoris' forward implements."""
    return not (
        lora.wd
        or lora.rank_dropout
        or lora.module_dropout
        or lora.bypass_mode
        or isinstance(lora.scalar, nn.Parameter)
        or lora.op not in (F.linear, F.conv2d)
    )


def _forward(lora: LohaModule, path: str, x: Tensor, *args, **kwargs) -> Tensor:
    org = lora.org_module[0]
    weight = org.weight.detach()
    bias = None if org.bias is None else org.bias.detach()
    gamma = lora.scale * float(lora.scalar) * lora.multiplier
    if path == "factored":
        return factored_forward(lora, gamma, x, _compute_dtype(x, weight))
    factors = _factors(lora)
    if path == "low-memory":
        return _LowMemoryLoha.apply(x, weight, bias, lora.op, lora.kw_dict, gamma, *factors)
    effective = _EffectiveWeight.apply(weight, gamma, *factors)
    compute = _compute_dtype(x, weight)
    bias = None if bias is None else bias.to(compute)
    return lora.op(x.to(compute), effective.to(compute), bias, **lora.kw_dict)


def _factors(lora: LohaModule) -> tuple[Tensor | None, ...]:
    """(w1a, w1b, w2a, w2b, t1, t2), the Tucker cores None without Tucker."""
    t1 = lora.hada_t1 if lora.tucker else None
    t2 = lora.hada_t2 if lora.tucker else None
    return lora.hada_w1_a, lora.hada_w1_b, lora.hada_w2_a, lora.hada_w2_b, t1, t2


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """What lycoris' op would run in: autocast's dtype when autocast is on, else the
    frozen weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _half(a: Tensor, b: Tensor, t: Tensor | None, shape: torch.Size) -> Tensor:
    """One Hadamard half, `a @ b` (or its Tucker rebuild), in the weight's shape."""
    if t is None:
        return (a @ b).reshape(shape)
    return torch.einsum(_TUCKER_REBUILD, t, b, a)


def _effective(weight: Tensor, gamma: float, factors: Sequence[Tensor | None]) -> Tensor:
    """`W + gamma * (half1 * half2)`, in the frozen weight's dtype, in-place where the
    temporaries are our own."""
    w1a, w1b, w2a, w2b, t1, t2 = factors
    with torch.autocast(weight.device.type, enabled=False):
        delta = _half(w1a, w1b, t1, weight.shape)
        delta.mul_(_half(w2a, w2b, t2, weight.shape)).mul_(gamma)
        if delta.dtype == weight.dtype:
            return delta.add_(weight)
        return delta.to(weight.dtype).add_(weight)


def _factor_grads(
    grad_weight: Tensor, gamma: float, factors: Sequence[Tensor | None], needs: Sequence[bool]
) -> list[Tensor | None]:
    """Gradients of the factors from the gradient of the effective weight.

    The two halves are rebuilt here with autograd and dropped at once, so only the
    factors had to be kept from the forward (what lycoris' HadaWeight also does).
    """
    inputs = [
        None if f is None else f.detach().requires_grad_(need)
        for f, need in zip(factors, needs, strict=True)
    ]
    wanted = [f for f in inputs if f is not None and f.requires_grad]
    if not wanted:
        return [None] * len(factors)
    a1, b1, a2, b2, c1, c2 = inputs
    with torch.enable_grad(), torch.autocast(grad_weight.device.type, enabled=False):
        shape = grad_weight.shape
        half1, half2 = _half(a1, b1, c1, shape), _half(a2, b2, c2, shape)
        grad = grad_weight.to(half1.dtype).mul(gamma)
        outputs = (half1, half2)
        grads = (grad * half2.detach(), grad.mul_(half1.detach()))
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
    return [next(found) if f is not None and f.requires_grad else None for f in inputs]


class _EffectiveWeight(torch.autograd.Function):
    """W + gamma * dW from the LoHA factors, saving only the factors ("fast")."""

    @staticmethod
    def forward(ctx, weight: Tensor, gamma: float, *factors: Tensor | None) -> Tensor:
        ctx.gamma = gamma
        ctx.save_for_backward(*factors)
        return _effective(weight, gamma, factors)

    @staticmethod
    def backward(ctx, grad_weight: Tensor):
        factors = ctx.saved_tensors
        grads = _factor_grads(grad_weight, ctx.gamma, factors, ctx.needs_input_grad[2:])
        return None, None, *grads


class _LowMemoryLoha(torch.autograd.Function):
    """The whole layer, `op(x, W + gamma * dW, bias)`, saving the input and the factors
    only; the effective weight is rebuilt in the backward ("low-memory")."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        op: Callable,
        kw: dict,
        gamma: float,
        *factors: Tensor | None,
    ) -> Tensor:
        compute, input_dtype = _compute_dtype(x, weight), x.dtype
        effective = _effective(weight, gamma, factors).to(compute)
        x = x.to(compute)
        with torch.autocast(x.device.type, enabled=False):
            out = op(x, effective, None if bias is None else bias.to(compute), **kw)
        ctx.save_for_backward(x, weight, *factors)
        ctx.op, ctx.kw, ctx.gamma, ctx.input_dtype = op, kw, gamma, input_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, *factors = ctx.saved_tensors
        needs_x, needs_factors = ctx.needs_input_grad[0], ctx.needs_input_grad[6:]
        grad_out = grad_out.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            effective = _effective(weight, ctx.gamma, factors).to(x.dtype)
            grad_x = None
            if needs_x:
                grad_x = _input_grad(ctx.op, ctx.kw, x, effective, grad_out).to(ctx.input_dtype)
            del effective
            grad_weight = _weight_grad(ctx.op, ctx.kw, x, weight.shape, grad_out)
        grads = _factor_grads(grad_weight, ctx.gamma, factors, needs_factors)
        return grad_x, None, None, None, None, None, *grads


def _input_grad(op: Callable, kw: dict, x: Tensor, weight: Tensor, grad_out: Tensor) -> Tensor:
    if op is F.linear:
        return grad_out @ weight
    return torch.nn.grad.conv2d_input(x.shape, weight, grad_out, **kw)


def _weight_grad(op: Callable, kw: dict, x: Tensor, shape: torch.Size, grad_out: Tensor) -> Tensor:
    if op is F.linear:
        return grad_out.reshape(-1, shape[0]).T @ x.reshape(-1, shape[1])
    return torch.nn.grad.conv2d_weight(x, shape, grad_out, **kw)
