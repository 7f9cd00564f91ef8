"""The online expert balancer on a served model whose routers favour experts 2 and 3 (issue 22): streams keep
running over gRPC, the balancer moves copies of the hot experts while serving, no stream fails, greedy tokens stay
equal to transformers, the busiest worker's share of the rows drops, and the counters and the routing profile
say what happened."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.expert_balance import RoutingProfile
from cluster.gateway.balancer import BalancerSettings
from cluster.gateway.server import GatewayOptions
from cluster.ray_engine import ClusterOptions
from protos import mixserve_pb2 as pb
from tests.e2e.harness import RunningGateway
from tests.metrics_page import metric, metrics_text
from tests.reference import random_prompts_and_greedy
from tests.tiny_models import write_tiny_mixtral
from workers.config import ModelConfig

FAVOURED = (2, 3)  # on worker 0 in the contiguous start placement of 8 experts + 2 copies on 2 workers
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return write_tiny_mixtral(tmp_path_factory.mktemp("skewed") / "m", hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                              num_experts_per_tok=2, sliding_window=None, favour_experts=FAVOURED)


def _stream(stub, prompt: list[int]) -> tuple[list[int], str | None]:
    sampling = pb.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens = []
    try:
        for chunk in stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling), timeout=60):
            tokens.extend(chunk.token_ids)
    except grpc.RpcError as exc:  # a failed stream is what the test counts
        return tokens, str(exc)
    return tokens, None


def _rows_per_worker(gateway: RunningGateway) -> list[int]:
    return [sum(map(sum, r["rows_per_expert"])) for r in gateway.engine.worker_readings()]


@pytest.mark.timeout(300)
def test_the_balancer_moves_hot_experts_while_streams_run(ray_cluster, skewed, tmp_path):
    prompts, expected = random_prompts_and_greedy(skewed, seed=5, lengths=(5, 12, 20, 8, 30, 16, 3, 11),
                                                  steps=NEW_TOKENS)
    profile = tmp_path / "profile.json"
    options = GatewayOptions(port=0, metrics_port=0, grace_s=5, save_routing_profile=profile,
                             balancer=BalancerSettings(interval_s=1.0, window_s=30.0, threshold=0.05))
    waves = {"before": [], "after": []}  # the busiest worker's share of each wave's rows, by placement
    failures, mismatches = [], 0
    with RunningGateway(skewed, workers=2, redundant_experts=2, options=options) as gateway, \
            ThreadPoolExecutor(len(prompts)) as pool:
        start = gateway.engine.placement
        assert {w for e in FAVOURED for w in start.workers_of_expert[e]} == {0}  # both hot experts on worker 0
        deadline = time.monotonic() + 120
        while not waves["after"] or len(waves["before"]) < 1:
            assert time.monotonic() < deadline, f"no move after 120 s of waves: {waves}"
            epoch, rows = gateway.engine.placement_epoch, _rows_per_worker(gateway)
            results = list(pool.map(lambda p: _stream(gateway.stub, p), prompts))
            failures += [error for _, error in results if error]
            mismatches += sum(tokens != want for (tokens, _), want in zip(results, expected, strict=True))
            added = [now - was for now, was in zip(_rows_per_worker(gateway), rows, strict=True)]
            if gateway.engine.placement_epoch == epoch:  # the whole wave ran on one placement
                waves["before" if epoch == 0 else "after"].append(max(added) / sum(added))
        moved_to = gateway.engine.placement
        runs = metric(metrics_text(gateway), "mixserve_balancer_runs_total")
        while metric(page := metrics_text(gateway), "mixserve_balancer_runs_total") < runs + 1:  # one more run
            assert time.monotonic() < deadline + 10, "the balancer stopped running"
            time.sleep(0.2)
    assert not failures and not mismatches, f"{len(failures)} streams failed, {mismatches} differ: {failures[:3]}"
    assert max(waves["after"]) < min(waves["before"]) - 0.1, waves
    print(f"busiest worker's share of the rows per wave: {waves}")
    for expert in FAVOURED:  # the hot experts got the redundant copies, one on each worker
        assert set(moved_to.workers_of_expert[expert]) == {0, 1}
    assert metric(page, "mixserve_balancer_runs_total") >= 2
    assert 1 <= metric(page, "mixserve_balancer_moves_total") <= 2
    assert metric(page, "mixserve_balancer_moved_copies_total") >= 2
    assert metric(page, "mixserve_balancer_move_seconds_count") >= 1
    current = metric(page, "mixserve_balancer_predicted_imbalance", '{placement="current"}')
    assert 0 < current < 1.5  # the last run predicts from the moved placement
    # the routing profile written at stop favours the hot experts, and a later start places for it
    cfg = ModelConfig.from_model_dir(skewed)
    saved = RoutingProfile.load(profile, num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts)
    per_expert = [sum(layer[e] for layer in saved.rows_LE) for e in range(cfg.num_local_experts)]
    assert sorted(range(8), key=per_expert.__getitem__)[-2:] == sorted(FAVOURED, key=per_expert.__getitem__)
    planned = ClusterOptions(num_workers=2, redundant_experts=2, routing_profile=saved).placement(8)
    for expert in FAVOURED:
        assert set(planned.workers_of_expert[expert]) == {0, 1}
