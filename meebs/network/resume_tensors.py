"""The network's part of `resume.state`: tensors that give the trained weights back bit
for bit, and loading them into a freshly built network of the same recipe."""

from __future__ import annotations

import torch
from lycoris.kohya import LycorisNetworkKohya
from lycoris.modules.full import FullModule
from torch import Tensor, nn

from meebs.errors import MeebsError
from meebs.network.algo_tensors import modules_of


def train_state(network: LycorisNetworkKohya) -> dict[str, Tensor]:
    """The network's state for `resume.state`: `state_dict()`, except that a full module
    keeps its trained weight and bias themselves (`.weight`, `.bias`): the `diff` it
    saves, weight - original, does not give the weight back bit for bit."""
    state = network.state_dict()
    for lora in network.loras:
        if isinstance(lora, FullModule):
            name = lora.lora_name
            state.pop(f"{name}.diff")
            state.pop(f"{name}.diff_b", None)
            state[f"{name}.weight"] = lora.weight.detach()
            if lora.bias is not None:
                state[f"{name}.bias"] = lora.bias.detach()
    return state


def load_train_state(network: LycorisNetworkKohya, state: dict[str, Tensor]) -> None:
    """Load what `train_state` gave: every tensor, and nothing else, has its place."""
    by_module = modules_of(state)
    unknown = sorted(set(by_module) - {lora.lora_name for lora in network.loras})
    if unknown:
        raise MeebsError(f"the saved state has modules this network lacks, e.g. {unknown[0]}")
    with torch.no_grad():
        for lora in network.loras:
            own = by_module.get(lora.lora_name, {})
            _check_state_shapes(lora, own)
            if not isinstance(lora, FullModule):
                lora.load_state_dict(own)
                continue
            lora.weight.copy_(own["weight"])
            if lora.bias is not None:
                lora.bias.copy_(own["bias"])


def _check_state_shapes(lora: nn.Module, own: dict[str, Tensor]) -> None:
    """A saved tensor of another shape than the network's, named (not torch's size error)."""
    expected = lora.state_dict()
    for key, tensor in sorted(own.items()):
        want = expected.get(key)
        if want is None or want.shape == tensor.shape:
            continue
        why = (
            ": a run from before meebs trained DoRA per input column (wd_on_output False) "
            "cannot resume; train it again"
            if key == "dora_scale"
            else ""
        )
        raise MeebsError(
            f"the saved state's {lora.lora_name}.{key} is {list(tensor.shape)}, this "
            f"network's is {list(want.shape)}{why}"
        )
