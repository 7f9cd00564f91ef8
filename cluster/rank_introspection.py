"""What the rank processes of a running engine report about themselves, for operators (the lines
`mixserve serve` logs at start) and for the bench (CPU seconds, per-phase timings).

Read-only: every function asks the actors over Ray and changes nothing.
"""

from __future__ import annotations

import ray

from cluster.actors import RankInfo
from cluster.ray_engine import RayExpertParallelEngine


def rank_infos(engine: RayExpertParallelEngine) -> dict[str, RankInfo]:
    """Per rank, by name ("coordinator", "worker 0", ...): its process, threads and loaded tensors."""
    ranks = engine.rank_actors()
    return dict(zip(ranks, ray.get([a.info.remote() for a in ranks.values()]), strict=True))


def describe_ranks(engine: RayExpertParallelEngine) -> list[str]:
    """One line per rank for the serve log: where it runs and what it holds."""
    return [
        f"{name}: pid {info.pid} on {info.node_ip}, {info.torch_threads} torch threads, "
        f"{len(info.tensor_names)} weight tensors"
        for name, info in rank_infos(engine).items()
    ]


def worker_stats(engine: RayExpertParallelEngine) -> list[dict]:
    """Per expert worker: steps served, seconds per phase (dispatch, experts, combine), rows per expert
    ([layer][expert]) and placement epoch (ExpertWorker.stats)."""
    return ray.get([w.stats.remote() for w in engine.workers])


def compiled_step_tokens(engine: RayExpertParallelEngine) -> int:
    """The coordinator's largest compiled step in tokens (0: none; see EngineSettings.compile_small_steps)."""
    return ray.get(engine.live_coordinator().compiled_step_tokens.remote())
