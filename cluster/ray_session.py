"""Connects to a Ray cluster, or starts a local one sized for the expert-parallel group.

Ray's token authentication stays as Ray sets it: on for a local cluster (Ray's default since 2.59; the token
is generated in ~/.ray/auth_token), as configured for a cluster joined with an address. What Ray says while it
starts (that token authentication is on, that a local instance started, the dashboard's address) is quieted
on this driver process through the `ray` logger, as Ray's logging guide configures it: ERROR while `ray.init`
runs, WARNING after, so later warnings (an actor that died, a resource request that cannot be met) still show.
The entry point says what it is starting; Ray's own processes still log to /tmp/ray/session_latest/logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

START_LOG_LEVEL = logging.ERROR  # the `ray` logger's level while ray.init runs
LOG_LEVEL = logging.WARNING  # and after


@contextmanager
def ray_session(address: str | None, num_ranks: int) -> Iterator[None]:
    """Connects to `address`, or starts a local cluster with a logical CPU for each of the `num_ranks`
    actors (coordinators and expert workers) at least; shuts Ray down on exit."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=START_LOG_LEVEL)
    else:  # a new local cluster (never one a stray `ray start` left behind); one logical CPU per rank at least
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_ranks), include_dashboard=False,
                 log_to_driver=False, logging_level=START_LOG_LEVEL)
    logging.getLogger("ray").setLevel(LOG_LEVEL)
    try:
        yield
    finally:
        ray.shutdown()
