"""The TensorBoard sidecar: its command line, defined once.

    python entrypoint.py tensorboard                      # http://127.0.0.1:6006, logdir outputs
    python entrypoint.py tensorboard --host 0.0.0.0       # in the container (compose.yaml)

Every run writes its event files to outputs/{name}/{run id}/logs, so `--logdir outputs`
shows every run, each under its own name, and a run still training shows up and grows
while it trains (TensorBoard re-reads the folder every `RELOAD_INTERVAL_S` seconds).

TensorBoard is started as `python -m tensorboard.main` with the interpreter that runs
meebs, so it is the tensorboard package of this environment (no TensorFlow needed). The
CLI replaces its own process with it (exec): in a container TensorBoard is then PID 1 and
receives `docker stop`'s SIGTERM itself. The tests start the same command as a
subprocess.

It listens on one address only: 127.0.0.1 unless told otherwise. `--bind_all` is never
passed; the container says `--host 0.0.0.0` and its port mapping decides who can reach it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from meebs.errors import MeebsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006
DEFAULT_LOGDIR = "outputs"
RELOAD_INTERVAL_S = 5
# Sample images kept per tag (TensorBoard keeps 10 by default, reservoir-sampled: with
# more epochs than that, some epochs' samples would be missing).
IMAGES_PER_TAG = 100


def sidecar_command(
    logdir: str | Path = DEFAULT_LOGDIR, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> list[str]:
    """The argv of the TensorBoard sidecar, argv[0] being this Python interpreter."""
    if not 0 <= port <= 65535:
        raise MeebsError(f"tensorboard: port {port} is not in 0..65535")
    return [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        host,
        "--port",
        str(port),
        "--reload_interval",
        str(RELOAD_INTERVAL_S),
        # The pure-Python loader: same behaviour on every platform, no extra data-server
        # process (the Rust one of tensorboard-data-server is only an optional speed-up).
        "--load_fast",
        "false",
        "--samples_per_plugin",
        f"images={IMAGES_PER_TAG}",
        "--window_title",
        "meebs",
    ]


def exec_sidecar(logdir: str | Path, host: str, port: int) -> None:
    """Replace this process with TensorBoard (never returns)."""
    argv = sidecar_command(logdir, host, port)
    print(f"starting TensorBoard: logdir {logdir}, host {host}, port {port}", flush=True)
    sys.stderr.flush()
    os.execv(argv[0], argv)
