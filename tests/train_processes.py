"""Real `train` processes to kill or race, forked from a server that imported everything.

Importing torch and the libraries a run needs takes about 7 s of a 2-core machine, a
short demo run about 4 s: a test that starts dozens of training processes forks each
from a server process (this file, run as a script) that has imported everything once
and run nothing, so no thread pool is forked. Every child is a real process with its own
pid that calls `meebs.cli.main(argv)`, so a SIGKILL to it is the real thing: no handler,
no cleanup.

A child can be armed to die (`os._exit(137)`, which skips every handler as SIGKILL
does) where a timer cannot aim: in the middle of writing its k-th file of one kind,
after a chosen number of bytes (or with the whole temp file written but not yet
renamed), or while latents are cached. It can also record every fsync, rename and mkdir
it makes, to check what reaches the disk in which order.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KILLED = (137, -9)  # os._exit(137) from an armed child, or SIGKILL
_HEX = frozenset("0123456789abcdef")
_NAMED = {"resume.state": "state", "manifest.json": "manifest"}


def final_name(temp_name: str) -> str:
    """The name a `write_atomic` temp file (`.{name}.{random}.tmp`) is renamed to."""
    return temp_name[1:].rsplit(".", 2)[0]


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def kind_of(name: str) -> str:
    """What a file under its final name is: state, manifest, sample, latent, network."""
    stem, _, extension = name.rpartition(".")
    if name in _NAMED:
        return _NAMED[name]
    if extension == "png":
        return "sample"
    if extension == "safetensors":
        return "latent" if len(stem) == 64 and set(stem) <= _HEX else "network"
    return "other"


# ------------------------------------------------------------------ the test's side
def one_repeat_demo_data(where: Path) -> Path:
    """A copy of the demo's 6 training images in `where`, each shown once an epoch (not
    10 times); runs compared byte for byte must share it, as its path is in their files."""
    shutil.copytree(REPO / "data" / "demo" / "train" / "10_meeb", where / "1_meeb")
    return where


def short_demo(data: Path, out: Path) -> list[str]:
    """`train` arguments for a short demo run of `data` (`one_repeat_demo_data`) into
    `out`: 3 epochs of 3 steps on the random `tiny` base, two samples after each,
    latents cached on disk too, one thread."""
    return [
        "train",
        "recipes/demo.yaml",
        "model.builtin=tiny",
        "train.epochs=3",
        "train.batch_size=2",
        f"data.train_dir={data}",
        "data.reg_dir=null",
        "data.cache_latents_to_disk=true",
        "sample.steps=2",
        "validation.enabled=false",
        "train.threads=1",
        f"output.dir={out}",
    ]


def outputs(run: Path) -> dict[str, str]:
    """A run's network files and samples, and their sha256."""
    files = [*run.glob("*.safetensors"), *run.glob("samples/*.png")]
    return {p.name: sha256(p) for p in sorted(files)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Ended:
    """How a child ended: its exit status (-9: SIGKILL), seconds since its fork, and what
    it printed."""

    status: int
    seconds: float
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.status in KILLED


@dataclass(frozen=True)
class Child:
    pid: int
    logs: Path  # its stdout and stderr: logs.out and logs.err


class Server:
    """The process the children are forked from; ask it to start and to wait for them."""

    def __init__(self) -> None:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path, "COLUMNS": "120"},
        )

    def _ask(self, **request: Any) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the server died (exit {self.process.poll()})"
        return json.loads(line)

    def start(self, argv: list[str], logs: Path, env: dict[str, str], **options: Any) -> Child:
        """Fork a child running `main(argv)` with `env` added to its environment.
        `options`: die={"write": [kind, index, bytes]} or {"caching": n}; slow=KIND
        (its files of that kind are written slowly); trace=FILE; start_at=EPOCH (it
        sleeps until then); run_dir_time=EPOCH (its run folder is named after it)."""
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        reply = self._ask(op="start", argv=argv, env=env, out=str(out), err=str(err), **options)
        return Child(reply["pid"], logs)

    def wait(self, child: Child, kill_after_s: float | None = None, timeout_s=300) -> Ended:
        """The child's end; SIGKILL it `kill_after_s` seconds after its fork if alive."""
        reply = self._ask(op="wait", pid=child.pid, kill_after_s=kill_after_s, timeout_s=timeout_s)
        out, err = child.logs.with_suffix(".out"), child.logs.with_suffix(".err")
        return Ended(reply["status"], reply["seconds"], out.read_text(), err.read_text())

    def close(self) -> None:
        """Stop it (it holds nothing: every child was waited for)."""
        self.process.kill()
        self.process.wait()


_shared: list[Server] = []


def shared_server() -> Server:
    """One server for every test module of the session (its imports cost 7 s)."""
    if not _shared:
        _shared.append(Server())
        atexit.register(_shared[0].close)
    return _shared[0]


# ------------------------------------------------------------------ the server's side
class _Stream:
    """A temp file's stream, passed through."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data) -> int:
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.stream.__exit__(*exc)


class _Dying(_Stream):
    """Dies after `limit` bytes or, given fewer, at the flush `write_atomic` makes before
    its fsync and rename: a complete temp file, not renamed."""

    def __init__(self, stream, limit: int):
        super().__init__(stream)
        self.limit, self.written = limit, 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        room = self.limit - self.written
        if len(data) >= room:
            self.stream.write(data[:room])
            self.stream.flush()
            os._exit(137)
        self.written += self.stream.write(data)
        return len(data)

    def flush(self) -> None:
        self.stream.flush()
        os._exit(137)


class _Slow(_Stream):
    """A slow disk: each write takes 50 ms, so two processes writing the same file at
    about the same moment surely overlap."""

    def write(self, data) -> int:
        time.sleep(0.05)
        written = self.stream.write(data)
        self.stream.flush()
        return written


def _wrap_temps(kind: str, wrap) -> None:
    """Pass each temp file of `kind` this process opens (write_atomic's) and its count
    so far to `wrap`, which returns the stream to write through."""
    real, seen = os.fdopen, [0]

    def fdopen(fd, *args, **kwargs):
        stream = real(fd, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if is_temp(name) and kind_of(final_name(name)) == kind:
            seen[0] += 1
            return wrap(stream, seen[0])
        return stream

    os.fdopen = fdopen


def _die_writing(kind: str, index: int, limit: int) -> None:
    """Die in the `index`-th temp file of `kind` after `limit` bytes."""
    _wrap_temps(kind, lambda stream, n: _Dying(stream, limit) if n == index else stream)


def _die_caching(after: int) -> None:
    """Die once the `after`-th latent is cached (encoded and written, or read)."""
    from meebs.data import latents

    fill = latents.LatentCache.fill

    def dying_fill(self, variants):
        for done in fill(self, variants):
            if done == after:
                os._exit(137)
            yield done

    latents.LatentCache.fill = dying_fill


def _trace(events: list) -> None:
    """Record each fsync (the path of its descriptor), rename (and the size moved) and
    mkdir, in order, after it returned."""

    def traced(name, record):
        real = getattr(os, name)

        def call(*args, **kwargs):
            event = record(*args)
            result = real(*args, **kwargs)
            events.append(event)
            return result

        setattr(os, name, call)

    traced("fsync", lambda fd: ["fsync", os.readlink(f"/proc/self/fd/{fd}")])
    for name in ("replace", "rename"):
        traced(name, lambda src, dst, *_, n=name: [n, str(src), str(dst), os.path.getsize(src)])
    traced("mkdir", lambda path, *_: ["mkdir", os.path.abspath(path)])


def _run_child(job: dict) -> None:
    """The forked child: set up as `job` says, run `main`, exit with its status."""
    from meebs.cli import main
    from meebs.runs import folders
    from meebs.training import train

    code, events = 1, []
    try:
        os.environ.update(job["env"])
        for fd, path in ((1, job["out"]), (2, job["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        die = job.get("die") or {}
        if "write" in die:
            _die_writing(*die["write"])
        if "caching" in die:
            _die_caching(die["caching"])
        if job.get("slow"):
            _wrap_temps(job["slow"], lambda stream, _: _Slow(stream))
        if job.get("run_dir_time"):
            at = job["run_dir_time"]
            train.new_run_dir = lambda recipe, now=None: folders.new_run_dir(recipe, at)
        if job.get("trace"):
            _trace(events)
        time.sleep(max(0.0, job.get("start_at", 0) - time.time()))
        code = main(job["argv"])
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    if job.get("trace"):
        Path(job["trace"]).write_text(json.dumps(events))
    os._exit(code)


def _wait(pid: int, forked_at: float, kill_after: float | None, timeout: float) -> dict:
    deadline = forked_at + (timeout if kill_after is None else kill_after)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    seconds = time.monotonic() - forked_at
    return {"status": os.waitstatus_to_exitcode(status), "seconds": seconds}


def serve() -> None:
    """Import what a run needs, then fork a child per `start` line read from stdin."""
    import meebs.cli
    import meebs.training.train  # noqa: F401

    forked: dict[int, float] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["op"] == "start":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(job)
            forked[pid] = time.monotonic()
            reply: dict = {"pid": pid}
        else:
            pid = job["pid"]
            reply = _wait(pid, forked.pop(pid), job.get("kill_after_s"), job["timeout_s"])
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
