"""Steps per second and peak memory, measured the same way on every training path.

Time to first step is given twice: from the meter's creation (the loop's own start-up:
latent caching, first batch) and from the process start (imports and model loading
too). Seconds per step leave the first step out: it pays one-off costs (allocator
warm-up, lazy initialisation); they are the median step.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PerfMeter:
    """Times steps without stalling the GPU.

    On CUDA the host only waits for the device at sync points (the first step, and the
    steps where the loop reads its losses back anyway): a step's time is the time between
    two sync points over the steps between them. On the CPU every step is a sync point.
    Time spent in `excluded()` (saving, sampling, validation) is not step time. The
    figure reported is the median, robust to a slow spell on a shared machine.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        self.first_step_at: float | None = None
        self.process_to_first_step = float("nan")
        self.steps = 0
        self.step_seconds: list[float] = []
        self._point: tuple[float, int] | None = None  # (time, steps) at the last sync point
        self._excluded = 0.0  # seconds in `excluded()` since the last sync point

    def step_done(self, sync: bool = True) -> None:
        """Count a step; with `sync` (or on the CPU, or the first step) also time it."""
        self.steps += 1
        if self.first_step_at is not None and self.cuda and not sync:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
            self.process_to_first_step = time.time() - psutil.Process().create_time()
        elif self._point is not None:
            at, steps = self._point
            per_step = (now - at - self._excluded) / (self.steps - steps)
            self.step_seconds += [per_step] * (self.steps - steps)
        self._point, self._excluded = (now, self.steps), 0.0

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Work between steps that is not step time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - started

    def summary(self) -> dict[str, float]:
        timed = len(self.step_seconds)
        per_step = statistics.median(self.step_seconds) if timed else float("nan")
        result = {
            "steps": float(self.steps),
            "timed_steps": float(timed),
            "time_to_first_step_s": (self.first_step_at or self.start) - self.start,
            "process_to_first_step_s": self.process_to_first_step,
            "seconds_per_step": per_step,
            "steps_per_second": 1 / per_step if timed else float("nan"),
            "peak_rss_gib": peak_rss_bytes() / 2**30,
        }
        if self.cuda:
            result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result

    def line(self) -> str:
        s = self.summary()
        text = (
            f"{s['steps_per_second']:.2f} steps/s ({s['seconds_per_step']:.3f} s/step), "
            f"first step after {s['time_to_first_step_s']:.1f} s, "
            f"peak RSS {s['peak_rss_gib']:.2f} GiB"
        )
        if "peak_cuda_gib" in s:
            text += f", peak CUDA {s['peak_cuda_gib']:.2f} GiB"
        return text
