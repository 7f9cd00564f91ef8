"""Connects to a Ray cluster, or starts a local one sized for the expert-parallel group."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray


@contextmanager
def ray_session(address: str | None, num_workers: int) -> Iterator[None]:
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a new local cluster (never one a stray `ray start` left behind); one logical CPU per rank at least
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_workers + 1), include_dashboard=False,
                 log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
