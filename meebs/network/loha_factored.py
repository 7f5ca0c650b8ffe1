"""LoHA at LoRA's cost: the layer's change applied through its exact low-rank factors.

A LoHA change is the Hadamard product of two low-rank matrices, and such a product has
rank at most r1*r2; it factors exactly (the face-splitting, or Khatri-Rao, identity):

    dW = (A1 @ B1) * (A2 @ B2) = U @ V,   U[:, (i, j)] = A1[:, i] * A2[:, j]   (out x r1*r2)
                                          V[(i, j), :] = B1[i, :] * B2[j, :]   (r1*r2 x in*kh*kw)

So the layer is `op(x, W) + gamma * U (V x)`: the frozen layer as it is, whose backward
needs only the input gradient (no full-size weight gradient), plus a LoCon-shaped branch
(a k x k convolution to r1*r2 channels, then a 1x1 one). Nothing of the layer's full size
is built: U and V cost (out + in*kh*kw) * r1*r2 numbers, and autograd carries the
gradients back to the four factors through them. With Tucker cores each half is
`A . (T x B)` and factors the same way pair by pair.

It is the same function as lycoris' LoHA (same factors, scale and file); only the order
of the float sums changes. It pays off while r1*r2 is small against the layer's sides:
`factored_pays` holds the measured rule, and a layer where it does not keeps the "fast"
path (meebs.network.loha_layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.modules.loha import LohaModule
from torch import Tensor

# Break-even constant of `factored_pays`, measured on this project's 2-core CPU with SD
# 1.5's layer shapes at 128 px (docs/performance.md "The factored layer"): the branch's
# forward and backward cost about COST_RATIO * T * r1*r2 * (in + out) against the
# T * in * out weight gradient and the weight rebuilds the fast path pays.
COST_RATIO = 3.0


def factored_pays(lora: LohaModule) -> bool:
    """Whether the factored branch is cheaper than building the full-size weight."""
    org = lora.org_module[0]
    weight = org.weight
    if lora.op not in (F.linear, F.conv2d) or lora.kw_dict.get("groups", 1) != 1:
        return False
    out_size, in_size = weight.shape[0], weight[0].numel()
    rank = lora.hada_w1_b.shape[0] * lora.hada_w2_b.shape[0]
    return COST_RATIO * rank * (in_size + out_size) < in_size * out_size


def factored_forward(lora: LohaModule, gamma: float, x: Tensor, compute: torch.dtype) -> Tensor:
    """`op(x, W, bias) + gamma * U (V x)`, in the `compute` dtype."""
    org = lora.org_module[0]
    weight = org.weight.detach().to(compute)
    bias = None if org.bias is None else org.bias.detach().to(compute)
    x = x.to(compute)
    with torch.autocast(x.device.type, enabled=False):
        frozen = lora.op(x, weight, bias, **lora.kw_dict)
        u, v = expansion(lora, weight.shape)
        u, v = u.to(compute), v.to(compute)
        if lora.op is F.linear:
            branch = F.linear(F.linear(x, v), u)
        else:
            inner = F.conv2d(x, v.reshape(-1, *weight.shape[1:]), None, **lora.kw_dict)
            branch = F.conv2d(inner, u[..., None, None])
    return frozen.add_(branch, alpha=gamma)


def expansion(lora: LohaModule, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(U, V) with U @ V == lycoris' dW: U is out x r1*r2, V is r1*r2 x in*kh*kw."""
    if lora.tucker:
        # Tucker: half = einsum("i j k l, j r, i p -> p r k l", t, b, a); a is r x out
        a1, a2 = lora.hada_w1_a.T, lora.hada_w2_a.T
        b1 = torch.einsum("i j k l, j r -> i r k l", lora.hada_t1, lora.hada_w1_b).flatten(1)
        b2 = torch.einsum("i j k l, j r -> i r k l", lora.hada_t2, lora.hada_w2_b).flatten(1)
    else:
        a1, a2, b1, b2 = lora.hada_w1_a, lora.hada_w2_a, lora.hada_w1_b, lora.hada_w2_b
    u = (a1[:, :, None] * a2[:, None, :]).flatten(1)
    v = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
    return u, v
