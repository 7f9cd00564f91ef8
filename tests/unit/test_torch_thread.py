"""TorchThread runs everything on one thread, in order, and raises the callee's errors at the caller."""

from __future__ import annotations

import threading

import pytest

from cluster.torch_thread import TorchThread


def test_calls_and_long_lived_work_share_one_thread():
    torch_thread = TorchThread()
    seen = [torch_thread.call(threading.get_ident) for _ in range(3)]
    release = threading.Event()
    loop = torch_thread.start(lambda: (release.wait(5), threading.get_ident())[1])
    assert not loop.done()
    release.set()
    assert loop.result(timeout=5) == seen[0]
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident()
    torch_thread.shutdown()


def test_errors_reach_the_caller():
    torch_thread = TorchThread()
    with pytest.raises(ZeroDivisionError):
        torch_thread.call(lambda: 1 / 0)
    assert torch_thread.call(lambda: 2) == 2, "the thread survives a failed call"
    torch_thread.shutdown()
