"""Per-step wall-clock breakdown by phase, read by benchmarks and metrics.

On CUDA a phase's kernels run after the host has moved on, so timings there synchronise the device at each
phase's start and end (what a phase costs, at the price of the overlap between phases); on CPU they don't.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PHASES = ("attention", "routing", "dispatch", "experts", "combine", "sampling")


@dataclass
class StepTimings:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    synchronize: Callable[[], None] | None = None  # waits for the device's queued work (CUDA)

    @classmethod
    def for_device(cls, device: torch.device) -> StepTimings:
        return cls(synchronize=torch.cuda.synchronize if device.type == "cuda" else None)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.synchronize is not None:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.seconds[name] += time.perf_counter() - start
