"""The Ray expert-parallel engine: parity for 1-4 workers, per-worker weight inventory, start failures that
name the worker, each rank's own CPU seconds, a worker killed mid-generation, and a clean shutdown."""

from __future__ import annotations

import json
import shutil
import socket
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.allocator import MallocSettings
from cluster.cpu_tuning import CpuPolicy
from cluster.engine import LLMEngine
from cluster.errors import WorkerStartError, WorkerUnavailable
from cluster.rank_introspection import compiled_step_tokens, rank_infos, worker_stats
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from cluster.settings import EngineSettings
from tests.reference import hf_greedy, load_hf
from workers.config import ParallelConfig
from workers.model.weights import expert_tensor_shapes
from workers.runtime.local_build import build_attention_rank

CPU = torch.device("cpu")


def _settings(model_dir) -> EngineSettings:
    return EngineSettings(model_dir=model_dir, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20)


def _engine(model_dir, workers: int, **options) -> RayExpertParallelEngine:
    return RayExpertParallelEngine(
        _settings(model_dir), ClusterOptions(num_workers=workers, cpu=CpuPolicy(threads_per_rank=1), **options)
    )


def _requests(prompts, n=16, **kw) -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"r{i}", prompt_token_ids=tuple(p), max_new_tokens=n, ignore_eos=True, **kw)
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def prompts_and_reference(tiny8):
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 23, 12, 1)]
    hf = load_hf(tiny8)
    in_process = LLMEngine(build_attention_rank(tiny8, dtype=torch.float32, device=CPU, num_blocks=128, block_size=16))
    local = [r.token_ids for r in in_process.generate(_requests(prompts))]
    assert local == [hf_greedy(hf, p, 16)[0] for p in prompts]
    return prompts, local


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 1, 2, 3, 4])
def test_greedy_tokens_equal_in_process_and_transformers(ray_cluster, tiny8, prompts_and_reference, workers):
    prompts, expected = prompts_and_reference
    with _engine(tiny8, workers) as engine:
        results = engine.generate(_requests(prompts))
        assert [r.token_ids for r in results] == expected
        stats = worker_stats(engine)
    if workers:
        routed = sum(sum(map(sum, s["rows_per_expert"])) for s in stats)
        tokens = sum(len(p) + 16 - 1 for p in prompts)  # every token but the last sampled one goes through
        assert routed == tokens * 2 * 2  # layers × tokens × top-k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 1])
def test_compiled_small_steps_keep_the_tokens(ray_cluster, tiny8, prompts_and_reference, workers):
    """compile_small_steps: the coordinator with every expert compiles its small steps, one with expert
    workers keeps them eager; the greedy tokens stay those of the eager in-process engine."""
    prompts, expected = prompts_and_reference
    settings = EngineSettings(model_dir=tiny8, device=CPU, dtype=torch.float32, kv_cache_bytes=8 * 2**20,
                              compile_small_steps=True)
    options = ClusterOptions(num_workers=workers, cpu=CpuPolicy(threads_per_rank=1))
    with RayExpertParallelEngine(settings, options) as engine:
        assert [r.token_ids for r in engine.generate(_requests(prompts))] == expected
        compiled = compiled_step_tokens(engine)
    assert (compiled >= 32) if workers == 0 else (compiled == 0)


@pytest.mark.timeout(300)
def test_each_worker_holds_only_its_experts(ray_cluster, tiny8):
    from workers.config import ModelConfig

    cfg = ModelConfig.from_model_dir(tiny8)
    placement = ParallelConfig.contiguous(num_experts=cfg.num_local_experts, num_workers=3)  # uneven: 3, 3, 2
    with _engine(tiny8, 3) as engine:
        inventories = {name: info.tensor_names for name, info in rank_infos(engine).items()}
    assert not [n for n in inventories["coordinator"] if ".block_sparse_moe.experts." in n]
    assert len(inventories["coordinator"]) > 0
    for w in range(3):
        expected = set(expert_tensor_shapes(cfg, placement.experts_of_worker(w)))
        assert set(inventories[f"worker {w}"]) == expected
    assert [len(placement.experts_of_worker(w)) for w in range(3)] == [3, 3, 2]


@pytest.mark.timeout(300)
def test_rank_cpu_seconds_are_each_ranks_own_process_time(ray_cluster, tiny8):
    """What `bench serve` reports per process: one reading per rank, taken in that rank's process, growing
    with the work it does, and bounded by the host's cores over the elapsed time."""
    with _engine(tiny8, 2) as engine:
        infos = rank_infos(engine)
        pids = {info.pid for info in infos.values()}
        before, start = {name: info.cpu_seconds for name, info in infos.items()}, time.monotonic()
        engine.generate(_requests([[3, 4, 5, 6] * 8] * 4, n=24))
        after = {name: info.cpu_seconds for name, info in rank_infos(engine).items()}
        elapsed = time.monotonic() - start
    assert len(pids) == 3 and set(before) == set(after) == {"coordinator", "worker 0", "worker 1"}
    used = [after[rank] - before[rank] for rank in before]
    assert all(u > 0 for u in used), used
    assert sum(used) <= psutil.cpu_count() * elapsed * 1.05 + 0.05, (used, elapsed)


@pytest.mark.timeout(300)
def test_bad_shard_names_the_worker(ray_cluster, tiny8, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny8, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.6.w1.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WorkerStartError, match=r"expert worker 1 \(experts 4,5,6,7\).*experts\.6\.w1"):
        _engine(broken, 2).start()
    _assert_no_mixserve_actors(ray_cluster)


@pytest.mark.timeout(300)
def test_bad_path_names_the_worker(ray_cluster, tiny_checkpoints, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["sharded_top2_gqa4"], sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.0.block_sparse_moe.experts.7.w2.weight"]
    for name, file in index["weight_map"].items():
        if file == victim and ".block_sparse_moe.experts." not in name:
            pytest.fail(f"test setup: shard {victim} also holds dense tensor {name}")
    (sharded / victim).rename(sharded / "moved.safetensors")
    with pytest.raises(WorkerStartError, match=rf"expert worker 3 \(experts 6,7\).*{victim}"):
        _engine(sharded, 4).start()


@pytest.mark.timeout(300)
def test_killed_worker_ends_the_request_with_an_error_not_a_hang(ray_cluster, tiny8):
    import ray

    engine = _engine(tiny8, 2, collective_timeout_s=10)
    engine.start()
    try:
        long_prompts = [[5] * 10, [7] * 30]
        for request in _requests(long_prompts, n=200):
            ray.get(engine.submit_ref(request))
        first, _ = engine.drain(30.0)
        assert first, "generation did not start"
        ray.kill(engine.workers[1], no_restart=True)
        killed_at = time.monotonic()
        with pytest.raises(WorkerUnavailable, match="lost"):
            _collect_until_error(engine, timeout_s=60)
        assert time.monotonic() - killed_at < 30
        with pytest.raises(WorkerUnavailable):
            engine.generate(_requests([[1, 2, 3]]))
    finally:
        engine.shutdown()
    _assert_no_mixserve_actors(ray_cluster)


def _collect_until_error(engine, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for update in engine.drain(1.0)[0]:
            if update.error:
                raise WorkerUnavailable(f"request {update.request_id} lost: {update.error}")
    raise AssertionError("no error within the timeout")


@pytest.mark.timeout(300)
def test_shutdown_leaves_no_actor_group_or_port(ray_cluster, tiny8):
    from ray.util import placement_group_table

    engine = _engine(tiny8, 2)
    engine.start()
    pg_id = engine.pg.id.hex()
    host, port = engine.rendezvous.removeprefix("tcp://").rsplit(":", 1)
    engine.generate(_requests([[3, 4, 5]], n=4))
    assert not _nothing_listens(host, int(port), timeout_s=0.2), "the group's store should listen while running"
    environs = {name: psutil.Process(info.pid).environ() for name, info in rank_infos(engine).items()}
    spin_counts = {name: env.get("GOMP_SPINCOUNT") for name, env in environs.items()}
    assert set(spin_counts.values()) == {"100"}, f"ranks sharing this host should spin briefly: {spin_counts}"
    for name, env in environs.items():
        missing = {k: v for k, v in MallocSettings().env_vars().items() if env.get(k) != v}
        assert not missing, f"{name} started without the malloc settings {missing}"
    engine.shutdown()
    _assert_no_mixserve_actors(ray_cluster)
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
    assert _nothing_listens(host, int(port), timeout_s=20), f"the rendezvous port {port} is still listening"


def _nothing_listens(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) != 0:  # refused: no listener left
                return True
        time.sleep(0.5)
    return False


def _assert_no_mixserve_actors(ray, timeout_s: float = 20.0) -> None:
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        address = ray.get_runtime_context().gcs_address  # this session's cluster, even if others run
        alive = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
                 if a.class_name in ("Coordinator", "ExpertWorker")]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, f"actors left behind: {alive}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("threads_per_rank", "reserved"), [(3, 1), (None, 1), (None, 0)])
def test_ranks_on_the_drivers_host_leave_reserved_cpus_to_it(ray_cluster, tiny8, threads_per_rank, reserved):
    """`mixserve serve` reserves a CPU for its gateway: every rank on the driver's host runs that many fewer
    torch threads than it would otherwise (at least one), with explicit and automatic thread counts."""
    cpu = CpuPolicy(threads_per_rank=threads_per_rank, reserved_cpus=reserved)
    engine = RayExpertParallelEngine(_settings(tiny8), ClusterOptions(num_workers=1, cpu=cpu))
    engine.start()
    try:
        base = threads_per_rank or psutil.cpu_count()
        expected = max(1, base - reserved)
        threads = {name: info.torch_threads for name, info in rank_infos(engine).items()}
        assert threads == {"coordinator": expected, "worker 0": expected}
        (result,) = engine.generate(_requests([[3, 4, 5]], n=4))
        assert len(result.token_ids) == 4
    finally:
        engine.shutdown()
