"""The numbers of a run's summary.json: setup, first step, steady speed, peak memory.

Timing reads the clock on the host; on a GPU the step's kernels may still be queued, so the
timer synchronizes once after the first step and once at the end, never inside a step.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch


class RunTimer:
    """Created when the run is; `start` before the first step, `step_done` after each,
    `stop` after the last; `summary` then gives the numbers."""

    def __init__(self):
        self.created = time.perf_counter()
        self.device = torch.device("cpu")
        self.started = self.first_step_done = self.ended = None
        self.first_step_seconds: float | None = None

    def start(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()

    def step_done(self) -> None:
        if self.first_step_seconds is None:
            synchronize(self.device)  # the one sync that makes this number true
            self.first_step_done = time.perf_counter()
            self.first_step_seconds = self.first_step_done - self.started

    def stop(self) -> None:
        synchronize(self.device)
        self.ended = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def summary(self, steps_done: int) -> dict[str, Any]:
        elapsed = self.seconds
        steady = (
            (steps_done - 1) / (self.ended - self.first_step_done)
            if steps_done > 1 and self.ended > self.first_step_done
            else None
        )
        return {
            "seconds": elapsed,
            "it_per_s": steps_done / elapsed if elapsed > 0 else None,
            # Steps after the first: no warm-up, compilation or cache effects.
            "steady_it_per_s": steady,
            "first_step_seconds": self.first_step_seconds,
            "setup_seconds": self.started - self.created,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, or resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
