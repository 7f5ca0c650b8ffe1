"""Two trainings of one recipe at once: each gets its own run folder and log folder, and
the latent disk cache they fill together, with the same images, holds only whole entries
that give a later run the same bytes.

Real processes (forked by `train_processes.py` from a server that imported everything)
start in the same instant and name their run folders after the same second.
"""

from __future__ import annotations

import json
import time

import pytest
from safetensors import safe_open
from train_processes import (
    Server,
    is_temp,
    one_repeat_demo_data,
    outputs,
    shared_server,
    short_demo,
)

pytestmark = pytest.mark.slow  # trains, and starts processes: `make test-fast` skips it


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


def test_two_runs_at_once_clash_nowhere_and_fill_the_cache_right(server, tmp_path):
    cache, out, logs = tmp_path / "cache", tmp_path / "out", tmp_path / "logs"
    data = one_repeat_demo_data(tmp_path / "data")
    argv = [*short_demo(data, out), f"output.logging_dir={logs}"]
    env = {"MEEBS_CACHE_DIR": str(cache)}  # empty: both encode the same images into it
    same = {"start_at": time.time() + 0.5, "run_dir_time": float(int(time.time()))}
    same["slow"] = "latent"  # their writes of the same entries overlap
    children = [server.start(argv, tmp_path / f"run{n}", env, **same) for n in (1, 2)]
    ended = [server.wait(child) for child in children]
    assert [e.status for e in ended] == [0, 0], [e.stderr[-2000:] for e in ended]
    runs = sorted(out.glob("meebs_demo/*"))
    assert len(runs) == 2 and runs[1].name == runs[0].name + "-2", runs
    assert sorted(p.name for p in logs.iterdir()) == [r.name for r in runs]
    for folder in logs.iterdir():
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1, folder
    assert outputs(runs[0]) == outputs(runs[1])
    assert [json.loads((r / "manifest.json").read_text())["run_id"] for r in runs] == [
        r.name for r in runs
    ]

    left = [p for p in [*tmp_path.rglob("*")] if is_temp(p.name)]
    assert not left, f"temp files left: {left}"
    hashes = json.loads((cache / "hashes.json").read_text())
    assert hashes["version"] == 1 and hashes["files"]
    entries = sorted(cache.glob("latents/*/*.safetensors"))
    assert len(entries) == 6
    for entry in entries:
        with safe_open(entry, "pt") as f:
            assert f.metadata()["address"] == entry.stem
            assert f.get_tensor("latent").isfinite().all()
    for run in ended:  # (neither found the other's entry corrupt, nor failed to write its own)
        assert "warning" not in run.stdout, [w for w in run.stdout.splitlines() if "warning" in w]

    alone = server.wait(server.start(argv, tmp_path / "run3", env))
    assert alone.status == 0, alone.stderr[-2000:]
    assert "0 encoded, 6 from the disk cache" in alone.stdout
    (third,) = set(out.glob("meebs_demo/*")) - set(runs)
    assert outputs(third) == outputs(runs[0])
