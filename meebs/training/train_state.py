"""The state a run needs to continue where it stopped: `resume.state` in its folder.

Resuming must give the same bytes as never stopping, so the state holds everything the
loop's future depends on: the network's fp32 weights, the optimizer's moments, the LR
schedule, every random generator, and the data position (the epoch, how many of its
batches are done, and the data generator's state at the epoch's start, from which the
epoch's batch order is rebuilt).

One safetensors file, written atomically: tensors as tensors, everything else as JSON in
its metadata. No pickle, so a state file is as safe to load as a network file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from meebs.errors import MeebsError
from meebs.files.safetensors_io import save_file_atomic

# a safetensors file, but not named .safetensors: loaders that scan a folder for networks
# (AUTOMATIC1111, ComfyUI) must not list it
STATE_NAME = "resume.state"
# 2: optimizer and schedule states as marked JSON trees (any nesting); 3: no `data_rng`
# (rebuilding the epoch's rounds from `epoch_rng` leaves the generator where it was)
FORMAT = 3


@dataclass
class Position:
    """Where in the plan the loop is: `batch` batches of `epoch` are done."""

    epoch: int
    batch: int
    step: int
    epoch_rng: list  # random.Random state at the epoch's start (rebuilds its batch order)
    epoch_losses: list[float]  # finished epochs' mean losses
    losses: list[float]  # this epoch's batch losses so far
    files: list[str] = field(default_factory=list)  # network files written so far
    evaluations: list[dict] = field(default_factory=list)  # validation's, so far


def rng_to_json(state: tuple) -> list:
    """random.Random's state in the form JSON gives back (lists, not tuples)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_from_json(saved: list) -> tuple:
    version, internal, gauss = saved
    return version, tuple(internal), gauss


@dataclass
class TrainState:
    position: Position
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    generators: dict[str, torch.Tensor]  # noise, vae, torch (global) [, cuda.N]


def save_state(path: Path, state: TrainState) -> None:
    """The trainer saves a state only right after a network file of the same weights,
    whose NaN/inf check (`network.refuse_non_finite`) has passed."""
    tensors = {f"network/{k}": v for k, v in state.network.items()}
    tensors |= {f"rng/{k}": v for k, v in state.generators.items()}
    meta = {
        "format": FORMAT,
        "position": asdict(state.position),
        "optimizer": to_json_tree(state.optimizer, "optimizer", tensors),
        "lr_scheduler": to_json_tree(state.lr_scheduler, "lr_scheduler", tensors),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file_atomic(tensors, path, {"meebs_state": json.dumps(meta)}, overwrite=True)


def load_state(path: Path) -> TrainState:
    if not path.is_file():
        raise MeebsError(
            f"{path.parent}: no saved state to resume from ({STATE_NAME} is written at each "
            "saved epoch and on Ctrl-C); train the recipe again"
        )
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meebs_state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as exc:
        raise MeebsError(f"{path}: unreadable training state ({exc}); train again") from None
    if meta.get("format") != FORMAT:
        raise MeebsError(
            f"{path}: state format {meta.get('format')!r}, expected {FORMAT} (written by "
            "another version of sd-meebs); train the recipe again"
        )

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        return TrainState(
            position=Position(**meta["position"]),
            network=group("network/"),
            optimizer=from_json_tree(meta["optimizer"], tensors),
            lr_scheduler=from_json_tree(meta["lr_scheduler"], tensors),
            generators=group("rng/"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MeebsError(f"{path}: incomplete training state ({exc!r}); train again") from None


# A state dict is a tree of dicts, lists and tuples whose leaves are tensors, numbers,
# strings, booleans or None: torch's optimizers keep `{"state": {param index: {...}}}`,
# bitsandbytes nests its quantisation state one level deeper, Prodigy keeps floats in its
# param groups. JSON alone would lose three things, so each gets a one-key marker object:
# a tensor (stored in the file as a tensor under the name given), a tuple (Adam's betas),
# and a dict whose keys are not all strings (the param indices are ints).
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def to_json_tree(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-able data; its tensors are added to `tensors` under `name/...`."""
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two tensors of the training state are both named {name}")
        tensors[name] = value
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: to_json_tree(v, f"{name}/{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[k, to_json_tree(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        items = [to_json_tree(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save {type(value).__name__} at {name} in the training state")


def from_json_tree(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `to_json_tree`."""
    if isinstance(value, list):
        return [from_json_tree(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(from_json_tree(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {k: from_json_tree(v, tensors) for k, v in value[_ITEMS]}
    return {k: from_json_tree(v, tensors) for k, v in value.items()}
