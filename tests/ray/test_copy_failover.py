"""Failover onto surviving expert copies (issue 22, build point 4): with replicas, a dead expert worker whose
experts all have a copy on another worker is left out of the group, which re-forms at once with the survivors
(nothing loads before serving resumes); its replacement then loads beside serving and rejoins. Greedy tokens
equal transformers throughout, for 1 and 2 coordinators."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from cluster.cpu_tuning import CpuPolicy
from cluster.errors import MoveFailed
from cluster.rank_introspection import rank_infos
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from tests.reference import random_prompts_and_greedy
from workers.config import ModelConfig
from workers.model.weights import expert_tensor_shapes

CPU = torch.device("cpu")
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts_and_expected(tiny8):
    return random_prompts_and_greedy(tiny8, seed=47, lengths=(11, 5, 19), steps=NEW_TOKENS)


def _requests(prompts, tag: str, new_tokens: int = NEW_TOKENS) -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=tuple(p), max_new_tokens=new_tokens,
                              ignore_eos=True) for i, p in enumerate(prompts)]


def _lose_requests_to_a_kill(engine: RayExpertParallelEngine, prompts, victim) -> None:
    """Starts long requests, kills `victim` once they decode, and waits for the engine to report them lost."""
    for i, request in enumerate(_requests(prompts, "doomed", new_tokens=400)):
        ray.get(engine.submit_ref(request, i % engine.num_coordinators))
    deadline = time.monotonic() + 60
    while not any(u.token_ids for u in engine.drain_all(1.0)[0]):
        assert time.monotonic() < deadline, "generation did not start"
    ray.kill(victim, no_restart=True)
    while True:
        assert time.monotonic() < deadline + 60, "the kill was not noticed"
        if any(u.error for u in engine.drain_all(1.0)[0]):
            return


def _opened_experts(engine: RayExpertParallelEngine, cfg: ModelConfig) -> dict[str, set[int]]:
    """Per worker in the group, the experts whose tensors its process read from the checkpoint."""
    per_expert = {name: e for e in range(cfg.num_local_experts) for name in expert_tensor_shapes(cfg, (e,))}
    return {name: {per_expert[t] for t in info.tensor_names}
            for name, info in rank_infos(engine).items() if name.startswith("worker")}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("coordinators", [1, 2], ids=["1-coordinator", "2-coordinators"])
def test_dead_worker_is_left_out_then_rejoins(ray_cluster, tiny8, prompts_and_expected, coordinators):
    prompts, expected = prompts_and_expected
    cfg = ModelConfig.from_model_dir(tiny8)
    settings = EngineSettings(model_dir=tiny8, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20)
    # 8 experts twice over 3 workers: [0..5], [6,7,0,1,2], [3..7]: any two workers hold every expert
    options = ClusterOptions(num_workers=3, num_coordinators=coordinators, redundant_experts=8,
                             cpu=CpuPolicy(threads_per_rank=1), collective_timeout_s=10)
    no_prefix_cache = SchedulerConfig(enable_prefix_caching=False)
    with RayExpertParallelEngine(settings, options, no_prefix_cache) as engine:
        assert [r.token_ids for r in engine.generate(_requests(prompts, "before"))] == expected
        pids = {name: info.pid for name, info in rank_infos(engine).items()}

        _lose_requests_to_a_kill(engine, prompts, engine.workers[1])
        report = engine.restart()
        assert report.left_out == ("expert worker 1",)
        assert report.replaced == () and not report.full
        assert engine.workers_up() == [True, False, True]
        assert engine.healthy() and engine.degraded
        assert engine.parallel.num_workers == 2 and engine.placement.num_workers == 3
        assert [r.token_ids for r in engine.generate(_requests(prompts, "degraded"))] == expected
        survivors = {name: info.pid for name, info in rank_infos(engine).items()}
        assert set(survivors) == set(pids) - {"worker 1"}
        assert all(pids[name] == pid for name, pid in survivors.items()), "the survivors kept their processes"
        with pytest.raises(MoveFailed, match=r"\[1\] are out of the group"):
            engine.move_replicas(engine.placement)

        assert engine.prepare_standby() == ("expert worker 1",)
        assert engine.workers_up() == [True, False, True], "a standby replacement is not in the group yet"
        assert [r.token_ids for r in engine.generate(_requests(prompts, "standby"))] == expected
        rejoin = engine.rejoin()
        assert rejoin.rejoined == ("expert worker 1",) and rejoin.replaced == () and rejoin.left_out == ()
        assert engine.workers_up() == [True, True, True] and not engine.degraded
        assert engine.parallel == engine.placement
        assert [r.token_ids for r in engine.generate(_requests(prompts, "after"))] == expected
        after = {name: info.pid for name, info in rank_infos(engine).items()}
        assert after["worker 1"] != pids["worker 1"]
        assert {n: p for n, p in after.items() if n != "worker 1"} == survivors
        opened = _opened_experts(engine, cfg)
        assert opened["worker 1"] == set(engine.placement.experts_of_worker(1)), "the replacement read only its own"


@pytest.mark.timeout(400)
def test_a_worker_without_surviving_copies_is_replaced(ray_cluster, tiny8, prompts_and_expected):
    """Worker 0 alone holds experts 3 and 4 when a second copy covers only 0..2 (R=3): it is replaced before
    serving resumes; a later death of worker 2 (whose experts 5..7 have copies on worker 1) is left out, and
    a failure of the last worker holding some expert while another is out fills every slot."""
    prompts, expected = prompts_and_expected
    settings = EngineSettings(model_dir=tiny8, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20)
    options = ClusterOptions(num_workers=3, redundant_experts=4, cpu=CpuPolicy(threads_per_rank=1),
                             collective_timeout_s=10)
    with RayExpertParallelEngine(settings, options, SchedulerConfig(enable_prefix_caching=False)) as engine:
        held = [set(engine.placement.experts_of_worker(w)) for w in range(3)]
        assert held == [{0, 1, 2, 3}, {4, 5, 6, 7}, {0, 1, 2, 3}], held
        _lose_requests_to_a_kill(engine, prompts, engine.workers[1])  # experts 4..7: no other copy
        report = engine.restart()
        assert report.replaced == ("expert worker 1",) and report.left_out == ()
        assert [r.token_ids for r in engine.generate(_requests(prompts, "replaced"))] == expected

        _lose_requests_to_a_kill(engine, prompts, engine.workers[2])  # its copies live on worker 0
        assert engine.restart().left_out == ("expert worker 2",)
        assert [r.token_ids for r in engine.generate(_requests(prompts, "degraded"))] == expected

        _lose_requests_to_a_kill(engine, prompts, engine.workers[0])  # the last copy of 0..3
        report = engine.restart()
        assert set(report.replaced) == {"expert worker 0", "expert worker 2"} and report.left_out == ()
        assert engine.workers_up() == [True, True, True]
        assert [r.token_ids for r in engine.generate(_requests(prompts, "full"))] == expected
