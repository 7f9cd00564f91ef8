"""Failover onto surviving expert copies through the gateway (issue 22, build point 4): with every expert on
two workers, SIGKILL of an expert worker during 16 streams re-forms the group without it at once (no load
before serving resumes), its replacement loads beside serving and rejoins in a planned pause that keeps
health SERVING while a second wave of streams decodes; every stream of both waves ends with the tokens of
an uninterrupted run."""

from __future__ import annotations

import concurrent.futures as futures

import pytest

from cluster.gateway.server import GatewayOptions
from cluster.rank_introspection import rank_infos
from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from tests.e2e.test_failover import STREAMS, HealthWatch, StreamRecord, _kill, _prompts, _stream, _wait
from tests.e2e.test_gateway import _metric, _metrics, offline

pytestmark = pytest.mark.timeout(900)
NEW_TOKENS = 200
SEEDED = range(0, STREAMS, 4)


def _request(i: int, prompt: list[int]) -> pb.GenerateRequest:
    sampling = (pb.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=40, seed=7 + i, ignore_eos=True)
                if i in SEEDED else pb.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)


def _expected(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    return [offline(model_dir, p, max_new=NEW_TOKENS,
                    **({"temperature": 0.8, "top_k": 40, "seed": 7 + i} if i in SEEDED else {}))
            for i, p in enumerate(prompts)]


def test_worker_sigkill_fails_over_to_copies_then_the_replacement_rejoins(ray_cluster, served_model):
    prompts = _prompts()
    expected = _expected(served_model, prompts)
    options = GatewayOptions(port=0, metrics_port=0, http_port=0, grace_s=5, rejoin_delay_s=1.5)
    with RunningGateway(served_model, workers=3, redundant_experts=8, options=options) as server:
        engine, client = server.engine, server.gateway.client
        assert all(engine.placement.covered_by(set(range(3)) - {w}) for w in range(3))
        before = {name: info.pid for name, info in rank_infos(engine).items()}
        waves = [[StreamRecord() for _ in prompts] for _ in range(2)]
        with HealthWatch(server.channel) as watch, futures.ThreadPoolExecutor(2 * STREAMS) as pool:
            first = [pool.submit(_stream, server.stub, _request(i, p), waves[0][i]) for i, p in enumerate(prompts)]
            _wait(lambda: min(len(r.tokens) for r in waves[0]) >= 5, 120, "the first wave decoding")
            killed = _kill(before["worker 1"])
            _wait(lambda: bool(engine.standby), 120, "the replacement loaded beside serving")
            # the second wave decodes (~3 s of 200 tokens) across the rejoin, 1.5 s after the load
            second = [pool.submit(_stream, server.stub, _request(i, p), waves[1][i]) for i, p in enumerate(prompts)]
            _wait(lambda: len(client.recoveries) >= 2 and client.recoveries[1].serving_at is not None, 120,
                  "the rejoin")
            for f in first + second:
                f.result(timeout=300)
        for wave in waves:
            assert [r.error for r in wave] == [None] * STREAMS
            for i, (record, want) in enumerate(zip(wave, expected, strict=True)):
                assert record.tokens == want, f"stream {i} differs"

        failover, rejoin = client.recoveries[:2]
        assert failover.restart.left_out == ("expert worker 1",) and failover.restart.replaced == ()
        assert rejoin.planned and rejoin.restart.rejoined == ("expert worker 1",) and rejoin.restart.replaced == ()
        assert failover.replayed == STREAMS and rejoin.replayed > 0, "each pause had streams in flight"
        resumed = min(t for r in waves[0] for t in r.arrivals if t > failover.restarted_at)
        print(f"failover: {failover.describe()}; first token after it {resumed - killed:.2f}s from the kill\n"
              f"rejoin: {rejoin.describe()}")
        # health: one NOT_SERVING span for the failure; the planned rejoin keeps SERVING
        assert watch.transitions() == [True, False, True]

        after = {name: info.pid for name, info in rank_infos(engine).items()}
        assert after["worker 1"] != before["worker 1"]
        assert {n: p for n, p in after.items() if n != "worker 1"} == {n: p for n, p in before.items()
                                                                          if n != "worker 1"}
        text = _metrics(server)
        assert _metric(text, "mixserve_copy_failovers_total") == 1
        assert _metric(text, "mixserve_worker_rejoins_total") == 1
        assert _metric(text, "mixserve_worker_recoveries_total") == 1
        assert _metric(text, "mixserve_expert_workers_left_out") == 0
        assert [_metric(text, "mixserve_worker_up", f'{{worker="{w}"}}') for w in range(3)] == [1, 1, 1]
        assert _metric(text, "mixserve_requests_total", '{code="OK"}') == 2 * STREAMS
