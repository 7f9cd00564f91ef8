"""How each rank process uses its host's CPUs: torch threads, OpenMP spinning, glibc malloc, and the
network interface its collectives bind to. The one place this policy lives: the engine plans it when it
places the ranks (`plan_rank_cpus`), each actor applies its `RankCpu` when its process starts.

Knows nothing of models, requests or Ray actors; reads the host's core count and interfaces only in
`RankCpu.apply`, which runs inside the rank's own process.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import psutil
import ray
import torch

from cluster.allocator import MallocSettings


@dataclass(frozen=True, kw_only=True)
class CpuPolicy:
    """The cluster-wide knobs (`ClusterOptions` carries them from the command line)."""

    threads_per_rank: int | None = None  # None: each host's cores divided among the ranks that compute at once
    # Ranks sharing a host take turns; libgomp's default keeps a rank's OpenMP threads spinning ~3 ms
    # after each parallel region, on the cores the next rank needs. Every rank that shares its host gets
    # this spin count (GOMP_SPINCOUNT; 100 is libgomp's own value for oversubscribed hosts); None keeps
    # the default. Measured with 1 worker on 2 cores (W1 / W2 offline): default 300k spins 20.1-21.7 s
    # on W2; 10,000: 4.9-5.8 s / 17.3-17.9 s; 100: 3.5-3.8 s / 16.3-16.8 s.
    shared_host_spin_count: int | None = 100
    # glibc malloc settings every rank process starts with (see cluster.allocator); None keeps glibc's own
    malloc: MallocSettings | None = field(default_factory=MallocSettings)
    # Ranks on the driver's host (where `mixserve serve` runs the gateway) use this many fewer torch threads
    # (at least 1), so the gateway's streaming does not pre-empt their OpenMP teams mid-region (vLLM's CPU
    # backend reserves a core for its API server the same way: VLLM_CPU_NUM_OF_RESERVED_CPU).
    reserved_cpus: int = 0

    def __post_init__(self) -> None:
        if self.threads_per_rank is not None and self.threads_per_rank < 1:
            raise ValueError(f"threads_per_rank must be >= 1, got {self.threads_per_rank}")
        if self.reserved_cpus < 0:
            raise ValueError(f"reserved_cpus must be >= 0, got {self.reserved_cpus}")


@dataclass(frozen=True, kw_only=True)
class RankCpu:
    """One rank's share: decided where it is placed, applied in its process (`apply`)."""

    threads: int | None  # torch threads; None: this host's cores // ranks_on_host
    ranks_on_host: int  # ranks of this host that compute at the same time
    reserved_cpus: int  # cores left to the gateway on this host
    env_vars: tuple[tuple[str, str], ...]  # set in the process before it starts (glibc, libgomp read them then)

    def torch_threads(self, host_cpus: int) -> int:
        threads = self.threads or max(1, host_cpus // max(1, self.ranks_on_host))
        return threads_after_reserve(threads, self.reserved_cpus)

    def apply(self) -> int:
        """In the rank's process, before any torch work: sets torch's threads and binds the collectives to
        the interface of this node's Ray address. Returns the thread count."""
        threads = self.torch_threads(os.cpu_count() or 1)
        torch.set_num_threads(threads)
        bind_collectives_to_node_interface()
        return threads


def threads_after_reserve(threads: int, reserved_cpus: int) -> int:
    """Torch threads of a rank that leaves reserved_cpus of its host to the gateway (at least 1)."""
    return max(1, threads - reserved_cpus)


def plan_rank_cpus(policy: CpuPolicy, nodes: list[str], driver_node: str) -> list[RankCpu]:
    """`nodes[r]` is the node of rank r (0 = the coordinator). The coordinator and the expert workers take
    turns (each waits in a collective while the other computes), so the coordinator may use every core
    of its host; expert workers compute at the same time, so they split their host's cores."""
    workers_per_node = Counter(nodes[1:])
    ranks_per_node = Counter(nodes)
    plan = []
    for rank, node in enumerate(nodes):
        env = dict(policy.malloc.env_vars()) if policy.malloc else {}
        if policy.shared_host_spin_count is not None and ranks_per_node[node] > 1:
            env["GOMP_SPINCOUNT"] = str(policy.shared_host_spin_count)
        plan.append(RankCpu(
            threads=policy.threads_per_rank, ranks_on_host=1 if rank == 0 else workers_per_node[node],
            reserved_cpus=policy.reserved_cpus if node == driver_node else 0, env_vars=tuple(sorted(env.items())),
        ))
    return plan


def bind_collectives_to_node_interface() -> str | None:
    """gloo (and NCCL's bootstrap) bind to the hostname's address unless told an interface; point them at
    the interface holding this node's Ray address, so ranks on different hosts can reach each other."""
    ip = ray.util.get_node_ip_address()
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            os.environ["NCCL_SOCKET_IFNAME"] = name
            return name
    return None
