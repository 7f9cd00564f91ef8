"""Live expert-copy moves on Ray (`RayExpertParallelEngine.move_replicas`, issue 22): the workers read their new
experts beside serving and every rank switches at one header exchange, so greedy tokens equal transformers
before, during and after moves, no request fails, and each worker then holds (and opened) only its new
experts' tensors."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.cpu_tuning import CpuPolicy
from cluster.errors import MoveFailed
from cluster.expert_balance import moved_copies
from cluster.rank_introspection import rank_infos, worker_stats
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from tests.reference import random_prompts_and_greedy
from workers.config import ModelConfig, ParallelConfig
from workers.model.weights import expert_tensor_shapes

CPU = torch.device("cpu")
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def prompts_and_expected(tiny8):
    return random_prompts_and_greedy(tiny8, seed=31, lengths=(9, 23, 4, 17), steps=NEW_TOKENS)


def rotated(parallel: ParallelConfig, shift: int) -> ParallelConfig:
    """The same copies with every worker's experts handed to the worker `shift` places on: every copy moves."""
    workers = parallel.num_workers
    moved = [(e, (w + shift) % workers) for e, ws in enumerate(parallel.workers_of_expert) for w in ws]
    first = tuple((parallel.worker_of_expert[e] + shift) % workers for e in range(parallel.num_experts))
    rest = tuple(sorted(set(moved) - set(enumerate(first))))
    return ParallelConfig(worker_of_expert=first, redundant_copies=rest, num_coordinators=parallel.num_coordinators,
                          collective_timeout_s=parallel.collective_timeout_s)


def _requests(prompts, tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=tuple(p), max_new_tokens=NEW_TOKENS,
                              ignore_eos=True) for i, p in enumerate(prompts)]


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("coordinators", "workers", "redundant"), [(1, 2, 2), (2, 4, 4)],
                         ids=["1-coordinator-2-workers-R2", "2-coordinators-4-workers-R4"])
def test_tokens_match_transformers_before_during_and_after_moves(ray_cluster, tiny8, prompts_and_expected,
                                                                 coordinators, workers, redundant):
    prompts, expected = prompts_and_expected
    settings = EngineSettings(model_dir=tiny8, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20)
    options = ClusterOptions(num_workers=workers, num_coordinators=coordinators, redundant_experts=redundant,
                             cpu=CpuPolicy(threads_per_rank=1))
    cfg = ModelConfig.from_model_dir(tiny8)
    no_prefix_cache = SchedulerConfig(enable_prefix_caching=False)  # every run computes (and routes) every token
    with RayExpertParallelEngine(settings, options, no_prefix_cache) as engine:
        start = engine.placement
        assert [r.token_ids for r in engine.generate(_requests(prompts, "before"))] == expected

        results, finished = [], threading.Event()

        def generate() -> None:
            try:
                results.extend(engine.generate(_requests(prompts, "during")))
            finally:
                finished.set()

        thread = threading.Thread(target=generate)
        thread.start()
        reports, shift = [], 1
        while not finished.is_set():  # move back and forth while the requests decode
            reports.append((engine.move_replicas(rotated(start, shift % workers)), finished.is_set()))
            shift += 1
        thread.join()
        during = [report for report, done in reports if not done]
        assert during, f"no move finished while the requests ran ({len(reports)} moves in all)"
        assert [r.token_ids for r in results] == expected
        assert [report.epoch for report, _ in reports] == list(range(1, len(reports) + 1))
        assert all(report.moved_copies > 0 for report, _ in reports)

        final = engine.placement
        assert final == rotated(start, (shift - 1) % workers)
        assert [r.token_ids for r in engine.generate(_requests(prompts, "after"))] == expected
        inventories = {name: info.tensor_names for name, info in rank_infos(engine).items()}
        stats = worker_stats(engine)
    for w in range(workers):  # each worker holds (and opened) only its experts under the final placement
        assert set(inventories[f"worker {w}"]) == set(expert_tensor_shapes(cfg, final.experts_of_worker(w)))
        assert stats[w]["placement_epoch"] == len(reports)
    served = sum(len(p) + NEW_TOKENS - 1 for p in prompts) * 3  # before, during and after
    rows = sum(sum(map(sum, s["rows_per_expert"])) for s in stats)
    assert rows == served * cfg.num_experts_per_tok * cfg.num_hidden_layers


@pytest.mark.timeout(200)
def test_an_idle_engine_moves_and_a_move_that_changes_the_ranks_is_refused(ray_cluster, tiny8,
                                                                          prompts_and_expected):
    prompts, expected = prompts_and_expected
    settings = EngineSettings(model_dir=tiny8, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20)
    options = ClusterOptions(num_workers=2, num_coordinators=2, redundant_experts=1, cpu=CpuPolicy(threads_per_rank=1))
    with RayExpertParallelEngine(settings, options) as engine:
        start = engine.placement
        began = time.monotonic()
        report = engine.move_replicas(rotated(start, 1))  # idle: the coordinators enter an exchange to switch
        assert time.monotonic() - began < options.collective_timeout_s / 4  # sooner than the next keepalive
        assert report.epoch == 1 and report.moved_copies == moved_copies(start, rotated(start, 1)) == 7
        with pytest.raises(MoveFailed, match="a move keeps the ranks"):
            engine.move_replicas(ParallelConfig.contiguous(num_experts=8, num_workers=3, num_coordinators=2))
        assert engine.placement == rotated(start, 1)
        assert [r.token_ids for r in engine.generate(_requests(prompts, "idle"))] == expected
