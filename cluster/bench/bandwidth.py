"""Measured memory bandwidth: the rate the roofline floors divide bytes by."""

from __future__ import annotations

import time

import torch

from cluster.bench.rank_driver import sync


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes read plus written per second by the best of `reps` device-to-device copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(reps + 2):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best
