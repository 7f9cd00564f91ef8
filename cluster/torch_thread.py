"""One thread per rank process for every torch call that can enter an OpenMP parallel region.

libgomp gives each thread that starts a parallel region its own team of worker threads. Once a process
holds more OpenMP threads than cores, libgomp cuts its spin-wait between regions from ~300,000 spins to
100, so workers sleep and wake around every small op: a W1 engine step of many small ops then runs
~1.8x slower (measured on this project's 2-core CPU: 1.3 s → 2.3 s for the W1 offline workload when the
weights were loaded on another thread than the one stepping the engine). Ray runs actor methods on
its own threads, so a rank loads its weights, joins its group and runs its loop all through this thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class TorchThread:
    def __init__(self, name: str = "torch") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Runs fn on the torch thread and waits for it; its exception is raised here."""
        return self._executor.submit(fn, *args).result()

    def start(self, fn: Callable[[], T]) -> Future[T]:
        """Runs a long-lived fn (an engine loop) on the torch thread; later calls queue behind it."""
        return self._executor.submit(fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
