"""The short demo run the engine tests share.

Two epochs of the demo data at batch 4 (60 steps, a few seconds on 2 cores) on the random
`tiny` base: these tests check the engine (files, metadata, logs, resume, generation),
not learning, so they skip the demo's own base, tiny-trained.
"""

import os
import signal

from meebs import perf

SHORT_RUN = ["model.builtin=tiny", "train.epochs=2", "train.batch_size=4", "sample.steps=2"]


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """A real signal to this process right after `step` finished, as Ctrl-C would send."""
    original = perf.PerfMeter.step_done

    def step_done(self, sync=True):
        original(self, sync)
        if self.steps == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(perf.PerfMeter, "step_done", step_done)
