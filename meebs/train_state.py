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
from meebs.safetensors_io import save_file_atomic

# a safetensors file, but not named .safetensors: loaders that scan a folder for networks
# (AUTOMATIC1111, ComfyUI) must not list it
STATE_NAME = "resume.state"
FORMAT = 1


@dataclass
class Position:
    """Where in the plan the loop is: `batch` batches of `epoch` are done."""

    epoch: int
    batch: int
    step: int
    epoch_rng: list  # random.Random state at the epoch's start (rebuilds its batch order)
    data_rng: list  # random.Random state now
    epoch_losses: list[float]  # finished epochs' mean losses
    losses: list[float]  # this epoch's batch losses so far
    files: list[str] = field(default_factory=list)  # network files written so far


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
    tensors = {f"network/{k}": v for k, v in state.network.items()}
    tensors |= {f"rng/{k}": v for k, v in state.generators.items()}
    optimizer_tensors, optimizer_rest = _split_optimizer(state.optimizer)
    tensors |= {f"optimizer/{k}": v for k, v in optimizer_tensors.items()}
    meta = {
        "format": FORMAT,
        "position": asdict(state.position),
        "optimizer": optimizer_rest,
        "lr_scheduler": state.lr_scheduler,
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
        raise MeebsError(f"{path}: state format {meta.get('format')!r}, expected {FORMAT}")

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return TrainState(
        position=Position(**meta["position"]),
        network=group("network/"),
        optimizer=_join_optimizer(group("optimizer/"), meta["optimizer"]),
        lr_scheduler=meta["lr_scheduler"],
        generators=group("rng/"),
    )


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's optimizer state_dict as tensors (`{param}/{name}`) and JSON (the rest)."""
    tensors, scalars = {}, {}
    for param, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value
            else:
                scalars[f"{param}/{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        param, name = key.split("/", 1)
        state.setdefault(int(param), {})[name] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]
    ]
    return {"state": state, "param_groups": groups}
