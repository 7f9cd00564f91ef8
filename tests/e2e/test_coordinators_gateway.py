"""A gateway over 2 coordinators sharing 2 expert workers (issue 18, acceptance 3): 64 concurrent streams are
placed on both (each takes 40-60% of them), every one completes with the tokens the offline engine gives,
and the metrics report each coordinator and the workers' own phases."""

from __future__ import annotations

import concurrent.futures as futures
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from tests.e2e.test_gateway import offline
from tests.metrics_page import metric, metrics_text

pytestmark = pytest.mark.timeout(600)

STREAMS = 64
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def server(ray_cluster, served_model):
    with RunningGateway(served_model, workers=2, coordinators=2, kv_cache_bytes=16 * 2**20) as running:
        yield running


def _stream(server: RunningGateway, prompt: list[int]) -> tuple[list[int], str]:
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    chunks = list(server.stub.GenerateStream(request, timeout=300))
    return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


def test_64_concurrent_streams_land_on_both_coordinators_and_all_complete(server, served_model):
    prompts = [[1, *(40 + (7 * i + j) % 250 for j in range(3 + i % 13))] for i in range(STREAMS)]
    with futures.ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(lambda p: _stream(server, p), prompts))
    assert [reason for _, reason in results] == ["length"] * STREAMS
    for index in (0, 1, 17, 63):  # whichever coordinator served it, the tokens are the offline engine's
        assert results[index][0] == offline(served_model, prompts[index], max_new=NEW_TOKENS)
    page = metrics_text(server)
    placed = [metric(page, "mixserve_coordinator_placed_requests_total", f'{{coordinator="{c}"}}') for c in (0, 1)]
    assert sum(placed) == STREAMS
    assert all(0.4 * STREAMS <= p <= 0.6 * STREAMS for p in placed), placed
    assert metric(page, "mixserve_num_coordinators") == 2
    assert metric(page, "mixserve_requests_total", '{finish_reason="length"}') >= STREAMS


def test_health_and_metrics_report_every_coordinator_and_the_workers_phases(server):
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    server.stub.Generate(pb.GenerateRequest(prompt_token_ids=[1, 50, 51], sampling=pb.SamplingParams(
        max_new_tokens=4, temperature=0.0, ignore_eos=True)), timeout=60)
    deadline = time.monotonic() + 10  # the gateway reads the workers' seconds once a second
    page = metrics_text(server)
    while metric(page, "mixserve_worker_phase_seconds_total", '{phase="experts"}') == 0:
        assert time.monotonic() < deadline, "no expert-worker phase seconds on /metrics after 10 s"
        time.sleep(0.5)
        page = metrics_text(server)
    for coordinator in ("0", "1"):
        assert metric(page, "mixserve_coordinator_up", f'{{coordinator="{coordinator}"}}') == 1
        assert f'mixserve_kv_cache_usage_ratio{{coordinator="{coordinator}"}}' in page
    for worker in ("0", "1"):
        assert metric(page, "mixserve_worker_up", f'{{worker="{worker}"}}') == 1
        assert metric(page, "mixserve_worker_phase_seconds_total", f'{{worker="{worker}",phase="experts"}}') > 0
        assert metric(page, "mixserve_expert_replica_rows_total", f'{{worker="{worker}"}}') > 0
    assert metric(page, "mixserve_expert_worker_imbalance_ratio", '{layer="0"}') >= 1.0
