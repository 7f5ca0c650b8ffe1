"""Stopping a command from outside: Ctrl-C (SIGINT) and SIGTERM.

SIGTERM is how `docker stop`, Kubernetes, Slurm and systemd ask a process to end, so a
training run treats it exactly like Ctrl-C: the first signal lets the current step finish,
saves it and stops; a second one stops at once. Either way the command exits with the
shell's convention, 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), so a
scheduler can tell a requested stop from a failure.

Outside the training loop a signal stops at once (Python's default for SIGINT; this
module gives SIGTERM the same behaviour, so `finally` blocks still run and nothing is
left half-written).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(KeyboardInterrupt):
    """A stop signal that ends the command at once. `reported` is set once a message
    saying what was kept has been printed, so the CLI does not print a second one."""

    def __init__(self, signum: int = signal.SIGINT, *, reported: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.reported = reported

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextmanager
def stop_at_once_on_sigterm() -> Iterator[None]:
    """For the whole command: SIGTERM raises `StopNow`, as SIGINT raises KeyboardInterrupt."""

    def handler(signum, frame):
        raise StopNow(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class StopFlag:
    """Set by the first stop signal; the loop reads it after each step."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_after_the_step() -> Iterator[StopFlag]:
    """First SIGINT/SIGTERM: set the flag (the loop finishes its step, saves, stops).
    Second: stop at once."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested:
            raise StopNow(signum)
        flag.signum = signum

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
