"""Steps per second and peak memory, measured the same way on every training path.

Time to first step is given twice: from the meter's creation (the loop's own start-up:
latent caching, first batch) and from the process start (imports and model loading
too). Seconds per step leave the first step out: it pays one-off costs (allocator
warm-up, lazy initialisation).
"""

from __future__ import annotations

import resource
import time

import psutil
import torch


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PerfMeter:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None
        self.process_to_first_step = float("nan")
        self.steps = 0

    def step_done(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
            self.process_to_first_step = time.time() - psutil.Process().create_time()
        self.last_step_at = now
        self.steps += 1

    def summary(self) -> dict[str, float]:
        timed = self.steps - 1
        seconds = (self.last_step_at - self.first_step_at) if timed > 0 else float("nan")
        per_step = seconds / timed if timed > 0 else float("nan")
        result = {
            "steps": float(self.steps),
            "time_to_first_step_s": (self.first_step_at or self.start) - self.start,
            "process_to_first_step_s": self.process_to_first_step,
            "seconds_per_step": per_step,
            "steps_per_second": 1 / per_step if timed > 0 else float("nan"),
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
