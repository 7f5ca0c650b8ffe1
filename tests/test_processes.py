"""Two data-parallel processes on the CPU, launched by accelerate itself (gloo).

`accelerate launch --multi_gpu --num_processes 2` with `Accelerator(cpu=True)` starts two
real processes here (`--cpu --num_processes 2` would silently run one: REFERENCE §9).
Both must end with the same network, and the result must be close to one process
with the same effective batch (2 processes x 2 = 1 process x 4): not equal, since each
process draws its own noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meebs.network.deltas import module_delta

pytestmark = pytest.mark.slow  # trains, or starts processes: `make test-fast` skips it

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "model.builtin=tiny",  # rank agreement, not learning: the random base
    "train.epochs=1",
    "sample.every_n_epochs=0",
    "validation.enabled=true",  # on the main process only: the ranks must still agree
    "output.save_precision=fp32",
    "train.threads=1",  # two processes on two cores
]


def train_run(out: Path, processes: int, batch: int, *extra: str) -> Path:
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        launch += ["--multi_gpu", "--num_processes", str(processes)]
    else:
        launch += ["--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    overrides = [*COMMON, f"output.dir={out}", f"train.batch_size={batch}", *extra]
    # several processes run `python -m meebs`, as `train --gpus N` launches them; one runs
    # entrypoint.py, as the container does
    script = ["--module", "meebs"] if processes > 1 else ["entrypoint.py"]
    command = [*launch, *script, "train", "recipes/demo.yaml", *overrides]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (out / "meebs_demo").iterdir()
    return run_dir


def deltas(path: Path) -> torch.Tensor:
    """Every module's LoHA weight delta, flattened: zero before training (lycoris starts one
    factor at zero), so the cosine compares what was learned, not the random init."""
    tensors = load_file(path)
    modules = sorted({key.split(".")[0] for key in tensors})
    parts = []
    for module in modules:
        own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(module + ".")}
        rows, cols = own["hada_w1_a"].shape[0], own["hada_w1_b"].shape[1]
        parts.append(module_delta(module, own, torch.Size([rows, cols])).flatten())
    return torch.cat(parts)


def test_two_processes_agree_and_match_one(tmp_path: Path) -> None:
    two = train_run(tmp_path / "two", processes=2, batch=2)
    one = train_run(tmp_path / "one", processes=1, batch=4)

    record = json.loads((two / "manifest.json").read_text())
    assert record["status"] == "finished"
    assert record["processes"]["count"] == 2
    assert record["validation"]["evaluations"]  # scored by the main process
    digests = record["processes"]["network_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks ended identical
    single = json.loads((one / "manifest.json").read_text())
    assert record["steps"] == single["steps"] == 30  # 60 batches of 2 = 30 steps of 2 x 2

    a, b = deltas(two / "meebs_demo.safetensors"), deltas(one / "meebs_demo.safetensors")
    a, b = a.double(), b.double()
    assert a.abs().max() > 0 and b.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    relative = ((a - b).norm() / b.norm()).item()
    print(
        "2 processes x batch 2 vs 1 process x batch 4, learned deltas: "
        f"cosine {cosine:.9f}, relative L2 difference {relative:.2e}"
    )
    assert cosine > 0.999 and relative < 0.01


def test_a_process_without_a_batch_still_steps_with_the_others(tmp_path: Path) -> None:
    """One image, no reg images: every batch holds one sample, so the second process has
    none in any round; it still joins each all-reduce and ends with the same network."""
    folder = tmp_path / "data" / "1_meeb"
    folder.mkdir(parents=True)
    image = sorted((ROOT / "data/demo/train/10_meeb").glob("*.png"))[0]
    for path in (image, image.with_suffix(".txt")):
        (folder / path.name).write_bytes(path.read_bytes())
    extra = [f"data.train_dir={folder.parent}", "data.reg_dir=null", "validation.enabled=false"]
    run = train_run(tmp_path / "out", 2, 1, "train.epochs=2", *extra)
    record = json.loads((run / "manifest.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 2
    digests = record["processes"]["network_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.parametrize(
    ("gpus", "message"),
    [("0", "GPUS=0: give 1 or more GPUs"), ("3", "GPUS=3 but this machine has")],
)
def test_gpus_is_checked_in_one_line_before_launch(gpus: str, message: str) -> None:
    command = [sys.executable, "entrypoint.py", "train", "recipes/demo.yaml", "--gpus", gpus]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_launch_hands_the_same_train_arguments_to_accelerate() -> None:
    from meebs.cli import _without_option
    from meebs.training.launch import check_gpus, launch_command

    check_gpus(2, available=2)  # no error
    argv = ["recipes/1.3.yaml", "--gpus", "4", "train.epochs=2", "--gpus=4"]
    args = _without_option(argv, "--gpus")
    assert args == ["recipes/1.3.yaml", "train.epochs=2"]
    command = launch_command(4, args)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4" and "--multi_gpu" in command
    assert command[-5:] == ["--module", "meebs", "train", "recipes/1.3.yaml", "train.epochs=2"]
