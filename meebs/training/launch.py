"""`train --gpus N` (`make train GPUS=N`): hand the run to `accelerate launch`.

accelerate starts the N processes and wires them together (NCCL on GPUs, gloo on CPUs);
the trainer then splits each step's batch between them (meebs.training.train). Nothing here
starts processes itself: the check that N makes sense comes first, in one line, then this
process is replaced by accelerate's launcher running the same train command.

Several machines: use accelerate's own configuration (`accelerate config`, or a YAML
with num_machines, machine_rank, main_process_ip and main_process_port) and run
`accelerate launch --config_file cluster.yaml --module meebs train RECIPE` on each.
"""

from __future__ import annotations

import os
import sys

from meebs.errors import MeebsError


def check_gpus(requested: int, available: int) -> None:
    if requested < 1:
        raise MeebsError(f"GPUS={requested}: give 1 or more GPUs, or leave GPUS out for one")
    if requested > available:
        found = f"{available} CUDA device(s)" if available else "no CUDA device"
        raise MeebsError(
            f"GPUS={requested} but this machine has {found}; use GPUS={max(available, 1)} "
            "or fewer (check `nvidia-smi` and the container's GPU access)"
        )


def launch_command(processes: int, train_args: list[str]) -> list[str]:
    """accelerate's launcher running `python -m meebs train …` in `processes` processes
    (the module, not entrypoint.py: an installed `meebs` has no entrypoint.py beside it)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    launcher += ["--dynamo_backend", "no"]  # precision comes from the recipe, not here
    return [*launcher, "--module", "meebs", "train", *train_args]


def launch(processes: int, train_args: list[str]) -> None:
    """Check `processes` against the GPUs present, then become accelerate's launcher;
    returns only for one GPU, which needs no launcher."""
    import torch

    check_gpus(processes, torch.cuda.device_count())
    if processes == 1:
        return
    command = launch_command(processes, train_args)
    os.execv(command[0], command)
