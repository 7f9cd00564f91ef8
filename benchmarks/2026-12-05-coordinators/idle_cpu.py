"""What an idle server costs: each rank's CPU seconds over 20 s with no requests, for 1 and 2 coordinators
sharing 2 expert workers (idle_cpu_polling.json: the same before idle coordinators stopped polling every
10 ms for their peers' steps).

    .venv/bin/python benchmarks/2026-12-05-coordinators/idle_cpu.py .cache/bench/w2
"""

from __future__ import annotations

import json
import sys
import time

import torch

from cluster.cpu_tuning import CpuPolicy
from cluster.rank_introspection import rank_infos
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.ray_session import ray_session
from cluster.settings import EngineSettings

IDLE_S = 20.0


def idle_cpu(model_dir: str, coordinators: int, workers: int) -> dict[str, float]:
    settings = EngineSettings(model_dir=model_dir, device=torch.device("cpu"), dtype=torch.float32,
                              kv_cache_bytes=64 * 2**20)
    options = ClusterOptions(num_workers=workers, num_coordinators=coordinators, cpu=CpuPolicy(threads_per_rank=1))
    with RayExpertParallelEngine(settings, options) as engine:
        time.sleep(2.0)
        before = {name: info.cpu_seconds for name, info in rank_infos(engine).items()}
        time.sleep(IDLE_S)
        after = {name: info.cpu_seconds for name, info in rank_infos(engine).items()}
    return {name: round((after[name] - before[name]) / IDLE_S, 4) for name in before}


def main() -> None:
    model_dir = sys.argv[1]
    with ray_session(None, 4):
        result = {f"{c} coordinators, 2 workers": idle_cpu(model_dir, c, 2) for c in (1, 2)}
    print(json.dumps({"idle_seconds": IDLE_S, "cpu_seconds_per_second": result}, indent=2))


if __name__ == "__main__":
    main()
