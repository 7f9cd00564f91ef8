"""Several coordinators on Ray (`ClusterOptions.num_coordinators`): each its own engine loop, KV cache and
update channel, all sending to the same expert workers in lockstep. Greedy tokens equal transformers whichever
coordinator a request lands on, an idle coordinator joins its peer's steps, and a dead coordinator is
replaced."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from cluster.cpu_tuning import CpuPolicy
from cluster.errors import WorkerUnavailable
from cluster.rank_introspection import rank_infos, worker_stats
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from cluster.settings import EngineSettings
from tests.reference import random_prompts_and_greedy
from workers.runtime.attention_rank import MicroBatching

CPU = torch.device("cpu")
NEW_TOKENS = 12


def _engine(model_dir, coordinators: int, workers: int, micro_batches: int = 2) -> RayExpertParallelEngine:
    """micro_batches 2 splits every step of 2 or more sequences (ping-pong on), 1 never (off)."""
    settings = EngineSettings(model_dir=model_dir, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20,
                              micro_batching=MicroBatching(micro_batches=micro_batches, min_tokens=1))
    options = ClusterOptions(num_workers=workers, num_coordinators=coordinators, cpu=CpuPolicy(threads_per_rank=1))
    return RayExpertParallelEngine(settings, options)


def _requests(prompts, tag: str = "r") -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=tuple(p), max_new_tokens=NEW_TOKENS,
                              ignore_eos=True) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def prompts_and_expected(tiny8):
    return random_prompts_and_greedy(tiny8, seed=23, lengths=(7, 19, 3, 30, 11), steps=NEW_TOKENS)


def _collect(engine: RayExpertParallelEngine, request_ids: set[str], timeout_s: float = 120.0) -> dict[str, list]:
    """Drains every coordinator until each request id has finished; raises on an error update."""
    tokens: dict[str, list[int]] = {rid: [] for rid in request_ids}
    pending = set(request_ids)
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"{sorted(pending)} unfinished after {timeout_s}s"
        for update in engine.drain_all(0.5)[0]:
            assert update.error is None, update.error
            tokens[update.request_id].extend(update.token_ids)
            if update.finish_reason:
                pending.discard(update.request_id)
    return tokens


@pytest.mark.timeout(300)
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one-batch", "ping-pong"])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_two_coordinators_match_transformers(ray_cluster, tiny8, prompts_and_expected, workers, micro_batches):
    """Coordinator 0 gets 3 prompts and coordinator 1 two, of different lengths: each worker receives both
    coordinators' rows in every collective (with ping-pong, in two micro-batches from each)."""
    prompts, expected = prompts_and_expected
    with _engine(tiny8, 2, workers, micro_batches) as engine:
        assert list(rank_infos(engine)) == ["coordinator 0", "coordinator 1",
                                            *(f"worker {w}" for w in range(workers))]
        results = engine.generate(_requests(prompts))  # spread over both coordinators in turn
        assert [r.token_ids for r in results] == expected
        stats = worker_stats(engine)
    routed = sum(sum(map(sum, s["rows_per_expert"])) for s in stats)
    tokens = sum(len(p) + NEW_TOKENS - 1 for p in prompts)  # every token but the last sampled one goes through
    assert routed == tokens * 2 * 2  # layers × tokens × top-k: every coordinator's rows reached the workers


@pytest.mark.timeout(300)
def test_an_idle_coordinator_joins_its_peers_steps(ray_cluster, tiny8, prompts_and_expected):
    """Work on one coordinator only, then on the other only, then both at once with different lengths: the
    idle one joins every step with nothing to send (else the workers' collectives would hang)."""
    prompts, expected = prompts_and_expected
    with _engine(tiny8, 2, 2) as engine:
        for coordinator in (1, 0):
            requests = _requests(prompts, tag=f"only{coordinator}-")
            for request in requests:
                engine.submit_ref(request, coordinator)
            tokens = _collect(engine, {r.request_id for r in requests})
            assert [tokens[r.request_id] for r in requests] == expected
        long_one = _requests(prompts[3:4], tag="long-")
        short_ones = _requests(prompts[:2], tag="short-")
        for request in long_one:
            engine.submit_ref(request, 0)
        for request in short_ones:
            engine.submit_ref(request, 1)
        tokens = _collect(engine, {r.request_id for r in long_one + short_ones})
        assert tokens["long-0"] == expected[3]
        assert [tokens["short-0"], tokens["short-1"]] == expected[:2]
        assert engine.coordinators_up() == [True, True] and engine.healthy()


@pytest.mark.timeout(300)
def test_a_killed_coordinator_is_replaced(ray_cluster, tiny8, prompts_and_expected):
    prompts, expected = prompts_and_expected
    with _engine(tiny8, 2, 2) as engine:
        os.kill(rank_infos(engine)["coordinator 1"].pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while engine.healthy():  # the survivor's collectives fail once its peer is gone
            assert time.monotonic() < deadline, "the engine still looks healthy 60 s after a coordinator died"
            time.sleep(0.2)
        with pytest.raises(WorkerUnavailable):
            engine.generate(_requests(prompts[:1], tag="lost-"), timeout_s=60)
        report = engine.restart()
        assert report.replaced == ("coordinator 1",) and not report.full
        assert [r.token_ids for r in engine.generate(_requests(prompts, tag="after-"))] == expected
        assert engine.coordinators_up() == [True, True]


def test_several_coordinators_need_expert_workers():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        ClusterOptions(num_workers=0, num_coordinators=2)
