"""The factored, fast and low-memory LoHA layers compute what lycoris' LohaModule computes.

Each case wraps one layer in a lycoris LohaModule with random (non-zero) factors, runs
forward and backward through lycoris' own forward, then through our path on the same
module, and compares the output and the gradient of the input and of every factor.
"""

from __future__ import annotations

import pytest
import torch
from lycoris.modules.loha import LohaModule
from torch import nn

from meebs.network.loha_factored import expansion, factored_pays
from meebs.network.loha_layer import LAYER_PATHS, use_layer_path

# Wide enough for the factored path to take them at rank 3 (r1*r2 = 9, see factored_pays)
LAYERS = {
    "linear": lambda: nn.Linear(96, 80),
    "conv1x1": lambda: nn.Conv2d(96, 80, 1),
    "conv3x3": lambda: nn.Conv2d(48, 64, 3, padding=1),
    "conv3x3-stride2": lambda: nn.Conv2d(48, 64, 3, stride=2, padding=1),
}


def inputs_for(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 5, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 9, 9, generator=generator)


def wrapped(kind: str, tucker: bool, multiplier: float) -> tuple[nn.Module, LohaModule]:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    lora = LohaModule("probe", layer, multiplier=multiplier, lora_dim=3, alpha=2, use_tucker=tucker)
    with torch.no_grad():  # lycoris zero-initialises one factor: make the delta non-zero
        for parameter in lora.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    lora.apply_to()
    return layer, lora


def run(layer: nn.Module, lora: LohaModule, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    lora.zero_grad(set_to_none=True)
    out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in lora.named_parameters() if p.grad is not None}
    return out.detach(), {"input": x.grad.clone(), **grads}


@pytest.mark.parametrize("path", ["factored", "fast", "low-memory"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("tucker", [False, True])
@pytest.mark.parametrize("multiplier", [1.0, 0.5, -0.75, 2.5])
def test_path_matches_lycoris(path: str, kind: str, tucker: bool, multiplier: float) -> None:
    layer, lora = wrapped(kind, tucker, multiplier)
    x = inputs_for(layer, torch.Generator().manual_seed(1))
    expected_out, expected_grads = run(layer, lora, x)
    assert use_layer_path([lora], path) == {path: 1}
    out, grads = run(layer, lora, x)

    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    expected_factors = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    if tucker and kind.startswith("conv3x3"):
        expected_factors |= {"hada_t1", "hada_t2"}
    assert set(grads) - {"input"} == expected_factors
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero_multiplier_is_the_frozen_layer_exactly() -> None:
    layer, lora = wrapped("conv3x3", False, 0.0)
    x = inputs_for(layer, torch.Generator().manual_seed(2))
    for path in ("factored", "fast", "low-memory"):
        use_layer_path([lora], path)
        with torch.no_grad():
            assert torch.equal(layer(x), lora.org_forward(x))


def test_lycoris_path_restores_its_forward() -> None:
    layer, lora = wrapped("linear", False, 1.0)
    use_layer_path([lora], "low-memory")
    assert use_layer_path([lora], "lycoris") == {"lycoris": 1}
    assert layer.forward == lora.forward


def test_unsupported_features_keep_lycoris_forward() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    lora = LohaModule("probe", layer, lora_dim=2, alpha=1, rank_dropout=0.5)
    lora.apply_to()
    assert use_layer_path([lora], "fast") == {"lycoris": 1}
    assert layer.forward == lora.forward


def test_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match="factored, fast, low-memory, lycoris"):
        use_layer_path([], "turbo")
    assert LAYER_PATHS == ("factored", "fast", "low-memory", "lycoris")


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("tucker", [False, True])
def test_the_expansion_is_lycoris_delta(kind: str, tucker: bool) -> None:
    """U @ V is the full-size change lycoris builds (the Khatri-Rao identity)."""
    layer, lora = wrapped(kind, tucker, 1.0)
    u, v = expansion(lora, layer.weight.shape)
    assert u.shape == (layer.weight.shape[0], 9)
    assert v.shape == (9, layer.weight[0].numel())
    delta = lora.get_weight(layer.weight.shape) / lora.scale  # lycoris: dW * scale
    torch.testing.assert_close((u @ v).reshape(delta.shape), delta, rtol=1e-5, atol=1e-6)


def test_factored_takes_a_layer_only_where_it_pays() -> None:
    """Rank 9 against a 20 x 24 layer: the branch would cost more than the weight."""
    torch.manual_seed(0)
    narrow, wide = nn.Linear(24, 20), nn.Linear(96, 80)
    loras = [LohaModule(f"probe{i}", m, lora_dim=3, alpha=1) for i, m in enumerate((narrow, wide))]
    for lora in loras:
        lora.apply_to()
    assert [factored_pays(lora) for lora in loras] == [False, True]
    assert use_layer_path(loras, "factored") == {"fast": 1, "factored": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["factored", "fast", "low-memory"])
def test_path_matches_lycoris_under_cuda_autocast(path: str, dtype: torch.dtype) -> None:
    """As training runs on a GPU: frozen weights in half precision, factors in fp32."""
    layer, lora = wrapped("conv3x3", False, 1.0)
    layer.to("cuda", dtype)
    lora.to("cuda")
    x = inputs_for(layer, torch.Generator().manual_seed(1)).cuda()

    def run_autocast() -> tuple[torch.Tensor, dict]:
        with torch.autocast("cuda", dtype=dtype):
            return run(layer, lora, x)

    expected_out, expected_grads = run_autocast()
    use_layer_path([lora], path)
    out, grads = run_autocast()
    tolerance = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float(), expected_out.float(), **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.float(), expected_grads[name].float(), **tolerance)
