"""SIGKILL at any moment never leaves a corrupt file under a final name, and a killed run
either resumes to the bytes of a run never killed or is refused in one line.

A chain of real `train` processes (`train_processes.py`) on a short demo run with the
latent disk cache on: each is killed, at a random moment (SIGKILL after a random delay)
or at a point a timer cannot aim at (mid-write of its k-th network file, resume state,
manifest, sample or latent cache entry, or while latents are cached), then the run is
resumed and killed again, until it finishes; then a new run, until `MEEBS_KILLS` kills
(`make fuzz`: 50). After each kill every file under a final name in the run folder and
the latent cache is complete (network files and samples: byte-identical to an
uninterrupted run's), and every finished run's files are that run's bytes.

The choices come from a seeded generator (`MEEBS_KILL_SEED`, printed; fixed unless
MEEBS_KILLS is set); only the timing of the wall-clock kills is not replayed exactly.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors import safe_open
from train_processes import (
    Ended,
    Server,
    is_temp,
    kind_of,
    one_repeat_demo_data,
    outputs,
    sha256,
    shared_server,
    short_demo,
)

from meebs.runs.folders import holding
from meebs.training.train_state import load_state

pytestmark = pytest.mark.slow  # trains, and starts processes: `make test-fast` skips it

KILLS = int(os.environ.get("MEEBS_KILLS", "10"))
SEED = int(
    os.environ.get("MEEBS_KILL_SEED")
    or (random.randrange(10**6) if "MEEBS_KILLS" in os.environ else 19)
)
# where a kill falls: a random moment, while latents are cached, or mid-write of a file
KINDS = ("wall", "caching", "latent", "network", "state", "sample", "manifest")


@dataclass
class Reference:
    """An uninterrupted run (into an empty latent cache), with what it wrote."""

    run: Path
    cache: Path
    seconds: float  # fork to exit
    events: list  # its fsyncs, renames and mkdirs, in order
    outputs: dict[str, str] = field(default_factory=dict)  # network files and samples: sha256
    counts: collections.Counter = field(default_factory=collections.Counter)  # writes per kind
    sizes: dict[str, int] = field(default_factory=dict)  # the largest file of each kind


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return one_repeat_demo_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(server, data, tmp_path_factory) -> Reference:
    where = tmp_path_factory.mktemp("reference")
    cache, trace = where / "cache", where / "trace.json"
    argv = short_demo(data, where / "out")
    child = server.start(argv, where / "log", {"MEEBS_CACHE_DIR": str(cache)}, trace=str(trace))
    ended = server.wait(child)
    assert ended.status == 0, ended.stderr[-3000:]
    (run,) = (where / "out").glob("meebs_demo/*")
    found = Reference(run, cache, ended.seconds, json.loads(trace.read_text()))
    found.outputs = outputs(run)
    for event in found.events:
        if event[0] == "replace" and is_temp(Path(event[1]).name):
            kind = kind_of(Path(event[2]).name)
            found.counts[kind] += 1
            found.sizes[kind] = max(found.sizes.get(kind, 0), event[3])
    return found


# ------------------------------------------------------------------ durability, traced
def test_every_output_is_fsynced_renamed_then_its_folder_fsynced(reference):
    """What a power cut needs: each file under a final name (in the run folder and the
    latent cache) got there by a rename of a temp file that was fsynced first, the
    folder was fsynced after the rename, and every folder made on the way was fsynced
    into its parent. Nothing else wrote there (TensorBoard's logs/ aside)."""
    events, roots = reference.events, (str(reference.run.parent), str(reference.cache))
    placed = {}
    for index, event in enumerate(events):
        if event[0] in ("replace", "rename") and event[2].startswith(roots):
            source, target = event[1], event[2]
            assert ["fsync", source] in events[:index], f"{target}: renamed before its fsync"
            folder = ["fsync", str(Path(target).parent)]
            assert folder in events[index + 1 :], f"{target}: its folder never fsynced after"
            placed[target] = index
        if event[0] == "mkdir" and event[1].startswith(roots):
            parent = ["fsync", str(Path(event[1]).parent)]
            assert parent in events[index + 1 :], f"{event[1]}: made, never fsynced into its parent"
    files = [p for p in [*reference.run.rglob("*"), *reference.cache.rglob("*")] if p.is_file()]
    unplaced = [str(p) for p in files if str(p) not in placed and "logs" not in p.parts]
    assert not unplaced, f"written without write_atomic: {unplaced}"


def test_a_run_killed_as_it_started_or_as_it_finished_is_refused_in_one_line(
    server, reference, tmp_path
):
    """Killed right after its folder was made (nothing in it yet) or right after its
    manifest said it finished (its state not yet removed): nothing to resume, in one
    line, and the finished run's stale state is removed."""
    started = tmp_path / "meebs_demo" / "20261125-181913-97847b7a"
    started.mkdir(parents=True)
    finished = tmp_path / "finished"
    finished.mkdir()
    shutil.copy(reference.run / "manifest.json", finished)
    (finished / "resume.state").write_bytes(b"left by a kill")
    for run, says in ((started, "train the recipe again"), (finished, "nothing to resume")):
        argv = ["train", "--resume", str(run)]
        ended = server.wait(server.start(argv, tmp_path / run.name, {}))
        assert ended.status == 2 and not ended.stdout, ended.stderr[-3000:]
        assert ended.stderr.count("\n") == 1 and says in ended.stderr, ended.stderr
    assert not (finished / "resume.state").exists()


def test_a_child_forked_while_a_run_is_held_does_not_hold_it(tmp_path):
    """A data-loader worker (forked) outlives a killed trainer by seconds: the run must
    be free once the trainer is gone, not once its last worker is."""
    started, says = os.pipe()
    with holding(tmp_path):
        child = os.fork()
        if child == 0:
            os.write(says, b"up")  # (past the fork hooks)
            time.sleep(10)
            os._exit(0)
    os.read(started, 2)
    try:
        with holding(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(says)


# ------------------------------------------------------------------ the chain of kills
def check_files(run: Path | None, cache: Path, reference: Reference) -> list[Path]:
    """Every file under a final name is complete; returns the temp files a kill left."""
    temps = []
    for path in sorted(cache.rglob("*")):
        if path.is_dir():
            continue
        if is_temp(path.name):
            temps.append(path)
        elif path.name == "hashes.json":
            json.loads(path.read_text())
        else:
            assert kind_of(path.name) == "latent", f"{path}: not a latent cache entry"
            with safe_open(path, "pt") as f:
                assert f.metadata()["address"] == path.stem, path
                assert f.get_tensor("latent").isfinite().all(), path
    for path in sorted(run.rglob("*")) if run else []:
        if path.is_dir() or "logs" in path.relative_to(run).parts:
            continue
        if is_temp(path.name):
            temps.append(path)
        elif path.name == "resume.state":
            load_state(path)
        elif path.name == "manifest.json":
            assert json.loads(path.read_text())["kind"]
        elif path.name == "recipe.yaml":
            assert yaml.safe_load(path.read_text())["train"]
        else:
            assert reference.outputs.get(path.name) == sha256(path), f"{path}: not the run's bytes"
            if path.suffix == ".png":
                Image.open(path).load()
            else:
                with safe_open(path, "pt") as f:
                    assert all(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118
    return temps


@dataclass
class Chain:
    """Fresh runs and resumes of them, killed again and again."""

    server: Server
    reference: Reference
    data: Path
    where: Path
    rng: random.Random
    run: Path | None = None
    log: list[str] = field(default_factory=list)
    tally: collections.Counter = field(default_factory=collections.Counter)
    lock_checked: bool = False

    def __post_init__(self) -> None:
        """A temp file in the latent cache as another run would be writing it now: its
        entry is never read, and it must outlive the stale ones the runs remove."""
        self.live = self.cache / "latents" / "00" / f".{'0' * 64}.safetensors.live0000.tmp"
        self.live.parent.mkdir(parents=True)
        self.live.write_bytes(b"being written")

    @property
    def cache(self) -> Path:
        return self.where / "cache"

    @property
    def out(self) -> Path:
        return self.where / "out"

    def say(self, line: str) -> None:
        self.log.append(line)
        print(line)

    def explain(self) -> str:
        return f"MEEBS_KILL_SEED={SEED}; the chain so far:\n" + "\n".join(self.log[-30:])

    def process(self, kind: str | None) -> Ended:
        """Start the next process (a fresh run, or a resume of the current one), armed to
        die as `kind` says (None: not at all), and wait for its end."""
        rng, reference = self.rng, self.reference
        if kind in ("latent", "caching") or rng.random() < 0.2:  # (the run reads or encodes)
            for entry in self.cache.glob("latents/*/*.safetensors"):
                entry.unlink()
        options, kill_after = {}, None
        if kind == "wall":
            kill_after = rng.uniform(0.0, reference.seconds)
        elif kind == "caching":
            options["die"] = {"caching": rng.randint(1, reference.counts["latent"])}
        elif kind:
            size = reference.sizes[kind]
            limit = rng.randrange(size) if rng.random() < 0.85 else size + 1  # +1: not renamed
            options["die"] = {"write": [kind, rng.randint(1, reference.counts[kind]), limit]}
        argv = ["train", "--resume", str(self.run)] if self.run else self.fresh_argv()
        before = set(self.out.glob("meebs_demo/*"))
        logs = self.where / f"process-{len(self.log)}"
        env = {"MEEBS_CACHE_DIR": str(self.cache)}
        ended = self.server.wait(self.server.start(argv, logs, env, **options), kill_after)
        if self.run is None:
            made = set(self.out.glob("meebs_demo/*")) - before
            self.run = made.pop() if made else None
        what = "resume" if "--resume" in argv else "fresh"
        self.say(f"{what} {kind or '-'} {options or kill_after or ''}: exit {ended.status}")
        return ended

    def fresh_argv(self) -> list[str]:
        return short_demo(self.data, self.out)

    def after_kill(self) -> None:
        """Check every file; age the cache's temp files so the next run may remove them."""
        for temp in check_files(self.run, self.cache, self.reference):
            self.tally["temp files left"] += 1
            if self.cache in temp.parents and temp != self.live:
                os.utime(temp, (time.time() - 7200,) * 2)

    def refused(self, ended: Ended) -> None:
        """A run no state was saved for: one line, no traceback, nothing to resume."""
        lines = [line for line in ended.stderr.splitlines() if line.strip()]
        assert ended.status == 2 and len(lines) == 1, ended.stderr[-3000:]
        assert lines[0].startswith("error: ") and "train the recipe again" in lines[0], lines
        assert "Traceback" not in ended.stdout + ended.stderr
        assert self.run and not (self.run / "resume.state").exists(), self.explain()
        self.tally[f"refused: {lines[0].split(': ', 2)[-1][:40]}"] += 1
        if "finished all" in lines[0]:  # killed after its manifest said so: the run is done
            self.finished()

    def finished(self) -> None:
        assert self.run is not None
        assert outputs(self.run) == self.reference.outputs, self.explain()
        left = [p.name for p in self.run.rglob("*") if is_temp(p.name) or p.name == "resume.state"]
        assert not left, f"{left} left in a finished run; {self.explain()}"

    def check_lock(self) -> None:
        """While another process holds the run (here: this test), a resume is refused in
        one line and removes nothing (the other process's temp files are its own)."""
        temp = self.run / ".meebs_demo.safetensors.live0000.tmp"
        temp.write_bytes(b"another process is writing this")
        descriptor = os.open(self.run, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            argv = ["train", "--resume", str(self.run)]
            env = {"MEEBS_CACHE_DIR": str(self.cache)}
            ended = self.server.wait(self.server.start(argv, self.where / "locked", env))
        finally:
            os.close(descriptor)
        assert ended.status == 2 and "another process" in ended.stderr, ended.stderr[-3000:]
        assert temp.exists()
        self.lock_checked = True
        self.say("resume while another process holds the run: refused, nothing removed")


@pytest.mark.timeout(120 + 30 * KILLS)
def test_killed_anywhere_resumes_to_the_same_bytes_or_is_refused_in_one_line(
    server, reference, data, tmp_path
):
    print(f"MEEBS_KILL_SEED={SEED} MEEBS_KILLS={KILLS}")
    rng = random.Random(SEED)
    chain = Chain(server, reference, data, tmp_path, rng)
    kinds: list[str] = []
    kills = 0
    for _ in range(4 * KILLS + 10):
        if kills >= KILLS and chain.run is None:
            break
        if not kinds:
            kinds = rng.sample(KINDS, len(KINDS))
        if chain.run and not chain.lock_checked and (chain.run / "resume.state").exists():
            chain.check_lock()
        kind = kinds[-1] if kills < KILLS else None
        resuming = chain.run is not None
        ended = chain.process(kind)
        if ended.killed:  # (a process that outlived its kill point keeps the kind for the next)
            kinds.pop()
            kills += 1
            chain.tally[f"killed: {kind}"] += 1
            chain.tally["killed in a resume" if resuming else "killed in a fresh run"] += 1
            chain.after_kill()
        elif ended.status == 2 and resuming:
            chain.refused(ended)
            chain.run = None
        elif ended.status == 0:
            assert "corrupt latent cache entry" not in ended.stdout, chain.explain()
            chain.finished()
            chain.tally["finished after a resume" if resuming else "finished unkilled"] += 1
            chain.run = None
        else:
            pytest.fail(f"exit {ended.status}: {ended.stderr[-3000:]}\n{chain.explain()}")
        if resuming and ended.status != 2:
            chain.tally["resumed"] += 1
    assert kills >= KILLS and chain.run is None, chain.explain()
    print(dict(sorted(chain.tally.items())))
    temps = list(chain.cache.rglob(".*.tmp"))
    assert temps == [chain.live], f"stale temps kept, or a live one removed: {temps}"
    if len(KINDS) <= KILLS:
        missed = [kind for kind in KINDS if not chain.tally[f"killed: {kind}"]]
        assert not missed, f"never killed at {missed}; {chain.explain()}"
