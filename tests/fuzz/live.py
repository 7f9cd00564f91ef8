"""Checks shared by the hostile-input and soak tests against a live gateway: /metrics, idleness, health, RSS.

Knows nothing of how the gateway was started; it takes a `tests.e2e.harness.RunningGateway`.
"""

from __future__ import annotations

import os
import re
import time

from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import mixserve_pb2 as pb
from tests.metrics_page import metric, metrics_text

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def status_codes(text: str) -> set[str]:
    """The gRPC status names that mixserve_requests_total has counted."""
    return set(re.findall(r'^mixserve_requests_total\{[^}]*code="([A-Z_]+)"', text, re.M))


def wait_idle(server, timeout_s: float = 30.0) -> str:
    """The metrics page once nothing runs, waits or holds a KV block (or the last page at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = metrics_text(server)
        busy = sum(metric(text, name) for name in (
            "mixserve_kv_cache_usage_ratio", "mixserve_num_requests_running", "mixserve_num_requests_waiting"))
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def assert_still_serving(server) -> str:
    """A normal request completes, health says SERVING, and the idle engine holds no KV block."""
    request = pb.GenerateRequest(prompt_token_ids=[1, 5, 9],
                                 sampling=pb.SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    response = server.stub.Generate(request, timeout=30)
    assert (response.finish_reason, response.usage.completion_tokens) == ("length", 3), response
    chunks = list(server.stub.GenerateStream(request, timeout=30))
    assert [t for c in chunks for t in c.token_ids] == list(response.token_ids)
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "mixserve.v1.MixServe"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, (service, status)
    text = wait_idle(server)
    for name in ("mixserve_kv_cache_usage_ratio", "mixserve_num_requests_running", "mixserve_num_requests_waiting"):
        assert metric(text, name) == 0, f"{name} is {metric(text, name)} on an idle server (leak?)"
    return text


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, from /proc (Linux)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES
