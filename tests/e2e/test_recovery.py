"""Killing an expert worker during 32 concurrent streams: nothing hangs, every request completes with the
right tokens or gets UNAVAILABLE, the gateway replaces the actors and serves again within 60 s, and the
next 100 requests all succeed."""

from __future__ import annotations

import concurrent.futures as futures
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from tests.e2e.test_gateway import _metric, _metrics, offline

pytestmark = pytest.mark.timeout(600)
SERVING = health_pb2.HealthCheckResponse.SERVING


def _stream(
    stub, prompt: list[int], max_new: int, first_token: threading.Event | None = None
) -> list[int] | grpc.StatusCode:
    """The stream's tokens, or its status code; sets first_token when its first chunk arrives."""
    request = pb.GenerateRequest(prompt_token_ids=prompt,
                                 sampling=pb.SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True))
    tokens: list[int] = []
    try:
        for chunk in stub.GenerateStream(request, timeout=90):
            tokens.extend(chunk.token_ids)
            if first_token is not None:
                first_token.set()
        return tokens
    except grpc.RpcError as exc:
        return exc.code()


def _wait_health(channel, want_serving: bool, timeout_s: float) -> float:
    stub = health_pb2_grpc.HealthStub(channel)
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            serving = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        except grpc.RpcError:
            serving = False
        if serving == want_serving:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"health did not become {'SERVING' if want_serving else 'NOT_SERVING'} in {timeout_s}s")


def test_killed_worker_during_32_streams(ray_cluster, served_model):
    import ray

    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 320, (int(n),), generator=gen).tolist() for n in torch.randint(2, 30, (32,))]
    expected = [offline(served_model, p, max_new=60) for p in prompts]
    with RunningGateway(served_model, workers=2) as server:
        decoding = threading.Event()  # some stream has its first token: the batch is decoding, ~59 steps to go
        with futures.ThreadPoolExecutor(32) as pool:
            pending = [pool.submit(_stream, server.stub, prompts[i], 60, decoding) for i in range(32)]
            assert decoding.wait(60), "no stream produced a token"
            ray.kill(server.engine.workers[1], no_restart=True)
            killed_at = time.monotonic()
            outcomes = [f.result(timeout=120) for f in pending]  # nothing hangs
        lost = [o for o in outcomes if o == grpc.StatusCode.UNAVAILABLE]
        for outcome, want in zip(outcomes, expected, strict=True):
            assert outcome == grpc.StatusCode.UNAVAILABLE or outcome == want, outcome
        assert lost, "killing a worker mid-generation should have cost some requests"

        detected = _wait_health(server.channel, want_serving=False, timeout_s=10)  # detection within 10 s
        _wait_health(server.channel, want_serving=True, timeout_s=60 - (time.monotonic() - killed_at))
        assert detected < 10
        assert time.monotonic() - killed_at < 60
        with futures.ThreadPoolExecutor(16) as pool:
            after = list(pool.map(lambda i: _stream(server.stub, prompts[i % 32], 8), range(100)))
        assert after == [e[:8] for e in (expected * 4)[:100]]
        text = _metrics(server)
        assert _metric(text, "mixserve_worker_failures_total") >= 1
        assert _metric(text, "mixserve_worker_recoveries_total") >= 1
        assert _metric(text, "mixserve_worker_up") == 2
        assert _metric(text, "mixserve_requests_total", '{code="UNAVAILABLE"}') == len(lost)
