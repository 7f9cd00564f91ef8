"""The per-rank CPU plan: threads, the gateway's reserved core, OpenMP spinning and malloc settings."""

from __future__ import annotations

from cluster.allocator import MallocSettings
from cluster.cpu_tuning import CpuPolicy, plan_rank_cpus
from cluster.settings import DEFAULT_MODEL_DIR, gateway_reserved_cpus
from workers.config import ModelConfig


def test_the_gateway_keeps_a_core_only_for_models_whose_tokens_are_cheap():
    assert gateway_reserved_cpus(ModelConfig.from_model_dir(DEFAULT_MODEL_DIR).active_params_per_token) == 1
    assert gateway_reserved_cpus(230_000_000) == 0  # W2: the reserved core cost 38% of its served tokens/s


def test_plan_splits_a_hosts_cores_among_its_workers_and_reserves_on_the_drivers_host():
    plan = plan_rank_cpus(CpuPolicy(reserved_cpus=1), ["a", "a", "b", "b"], driver_node="a")
    assert [p.ranks_on_host for p in plan] == [1, 1, 2, 2]  # the coordinator takes turns with its workers
    assert [p.reserved_cpus for p in plan] == [1, 1, 0, 0]
    assert [p.torch_threads(8) for p in plan] == [7, 7, 4, 4]
    env = dict(plan[2].env_vars)
    assert env["GOMP_SPINCOUNT"] == "100" and env.items() >= MallocSettings().env_vars().items()
    alone = plan_rank_cpus(CpuPolicy(), ["a", "b"], driver_node="c")
    assert "GOMP_SPINCOUNT" not in dict(alone[1].env_vars), "a rank alone on its host keeps libgomp's spinning"
