"""Redundant experts on Ray (`ClusterOptions.redundant_experts`, issue 22): copies of experts on several expert
workers, each worker opening only the tensors of the experts it holds; the coordinators split a replicated
expert's rows between its copies, and greedy tokens equal transformers."""

from __future__ import annotations

import pytest
import torch

from cluster.cpu_tuning import CpuPolicy
from cluster.rank_introspection import rank_infos, worker_stats
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from cluster.settings import EngineSettings
from tests.reference import random_prompts_and_greedy
from workers.config import ModelConfig
from workers.model.weights import expert_tensor_shapes
from workers.runtime.attention_rank import MicroBatching

CPU = torch.device("cpu")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts_and_expected(tiny8):
    return random_prompts_and_greedy(tiny8, seed=29, lengths=(7, 19, 3, 30, 11), steps=NEW_TOKENS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("coordinators", "workers", "redundant", "micro_batches"), [(1, 3, 1, 1), (2, 4, 8, 2)],
    ids=["1-coordinator-3-workers-R1", "2-coordinators-4-workers-R8-ping-pong"],
)
def test_redundant_experts_match_transformers(ray_cluster, tiny8, prompts_and_expected, coordinators, workers,
                                              redundant, micro_batches):
    prompts, expected = prompts_and_expected
    settings = EngineSettings(model_dir=tiny8, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20,
                              micro_batching=MicroBatching(micro_batches=micro_batches, min_tokens=1))
    options = ClusterOptions(num_workers=workers, num_coordinators=coordinators, redundant_experts=redundant,
                             cpu=CpuPolicy(threads_per_rank=1))
    requests = [GenerationRequest(request_id=f"r{i}", prompt_token_ids=tuple(p), max_new_tokens=NEW_TOKENS,
                                  ignore_eos=True) for i, p in enumerate(prompts)]
    with RayExpertParallelEngine(settings, options) as engine:
        placement = engine.placement
        inventories = {name: info.tensor_names for name, info in rank_infos(engine).items()}
        results = engine.generate(requests)  # spread over the coordinators in turn
        assert [r.token_ids for r in results] == expected
        stats = worker_stats(engine)
    cfg = ModelConfig.from_model_dir(tiny8)
    assert sum(placement.copies_of_expert) == cfg.num_local_experts + redundant
    for w in range(workers):  # each worker opened only its own experts' tensors
        assert set(inventories[f"worker {w}"]) == set(expert_tensor_shapes(cfg, placement.experts_of_worker(w)))
    rows = [list(map(sum, zip(*s["rows_per_expert"], strict=True))) for s in stats]  # [worker][expert]
    tokens = sum(len(p) + NEW_TOKENS - 1 for p in prompts)  # every token but the last sampled one goes through
    assert sum(map(sum, rows)) == tokens * cfg.num_experts_per_tok * cfg.num_hidden_layers
    for expert, holders in enumerate(placement.workers_of_expert):  # every copy served rows
        served = [rows[w][expert] for w in holders]
        assert all(served), f"expert {expert}: rows per copy {served} on workers {holders}"


def test_redundant_experts_need_expert_workers():
    with pytest.raises(ValueError, match=r"redundant_experts \(2\) are copies on expert workers"):
        ClusterOptions(num_workers=0, redundant_experts=2)
    with pytest.raises(ValueError, match="redundant_experts must be >= 0"):
        ClusterOptions(num_workers=2, redundant_experts=-1)
