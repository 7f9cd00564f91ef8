"""StepTimings: a phase's seconds add up, and on a device that runs asynchronously (CUDA) every phase waits
for the device at its start and end, so its time is its own kernels'."""

from __future__ import annotations

import time

import torch

from workers.runtime.timing import StepTimings


def test_phases_accumulate_and_cpu_never_synchronises():
    timings = StepTimings.for_device(torch.device("cpu"))
    assert timings.synchronize is None
    for _ in range(2):
        with timings.phase("attention"):
            time.sleep(0.01)
    assert 0.02 <= timings.seconds["attention"] < 0.5
    assert timings.seconds["experts"] == 0.0


def test_a_synchronising_device_is_waited_for_around_every_phase():
    events = []
    timings = StepTimings(synchronize=lambda: events.append("sync"))
    with timings.phase("experts"):
        events.append("work")
    assert events == ["sync", "work", "sync"]
    assert StepTimings.for_device(torch.device("cuda", 0)).synchronize is torch.cuda.synchronize
