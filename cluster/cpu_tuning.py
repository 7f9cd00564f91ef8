"""How each rank process uses its host's CPUs: torch threads, OpenMP spinning, glibc malloc, the network
interface its collectives bind to and, on NCCL, how its process group reacts to a dead peer
(`nccl_fault_env`, docs/FAULT_TOLERANCE.md). The one place this policy lives: the engine plans it when it
places the ranks (`plan_rank_cpus`), each actor applies its `RankCpu` when its process starts.

Knows nothing of models, requests or Ray actors; reads the host's core count, interfaces and environment
only in `RankCpu.apply`, which runs inside the rank's own process. A variable the user set there (NCCL_*,
TORCH_NCCL_*, GLOO_SOCKET_IFNAME) is never overwritten.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
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
    # NCCL ranks: the group's collective timeout; `apply` adds `nccl_fault_env` to the process's environment
    # (torch reads it when the process group is created). None: a gloo rank, nothing to add.
    nccl_timeout_s: float | None = None

    def torch_threads(self, host_cpus: int) -> int:
        threads = self.threads or max(1, host_cpus // max(1, self.ranks_on_host))
        return threads_after_reserve(threads, self.reserved_cpus)

    def apply(self) -> int:
        """In the rank's process, before any torch work: sets torch's threads, NCCL's fault handling (NCCL
        ranks) and binds the collectives to the interface of this node's Ray address, each where the user
        has not set it. Done here, not in the actor's runtime_env, because Ray's runtime_env variables
        override the node's own environment. Returns the thread count."""
        threads = self.torch_threads(os.cpu_count() or 1)
        torch.set_num_threads(threads)
        if self.nccl_timeout_s is not None:
            os.environ.update(nccl_fault_env(self.nccl_timeout_s, os.environ))
        bind_collectives_to_node_interface()
        return threads


def threads_after_reserve(threads: int, reserved_cpus: int) -> int:
    """Torch threads of a rank that leaves reserved_cpus of its host to the gateway (at least 1)."""
    return max(1, threads - reserved_cpus)


def plan_rank_cpus(
    policy: CpuPolicy, nodes: list[str], driver_node: str, *, nccl_timeout_s: float | None = None
) -> list[RankCpu]:
    """`nodes[r]` is the node of rank r (0 = the coordinator). The coordinator and the expert workers take
    turns (each waits in a collective while the other computes), so the coordinator may use every core
    of its host; expert workers compute at the same time, so they split their host's cores.
    `nccl_timeout_s`: the collective timeout of an NCCL group (None for gloo), for `nccl_fault_env`."""
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
            nccl_timeout_s=nccl_timeout_s,
        ))
    return plan


# Older names torch still reads for the same setting: a user's value under one of them must not be shadowed
# by mixserve's default under the TORCH_NCCL_* name (torch reads that one first).
NCCL_ENV_ALIASES = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": ("NCCL_ASYNC_ERROR_HANDLING",),
    "TORCH_NCCL_BLOCKING_WAIT": ("NCCL_BLOCKING_WAIT",),
}


def nccl_fault_env(collective_timeout_s: float, user_env: Mapping[str, str]) -> dict[str, str]:
    """The TORCH_NCCL_* variables of an NCCL rank, chosen so that a dead peer costs a surviving rank its
    communicator, not its process: the watchdog aborts the communicator after `collective_timeout_s` (or on
    an NCCL error), the survivor's blocked collective returns and its next one raises DistBackendError.
    Why each value: docs/FAULT_TOLERANCE.md. A variable the user set in `user_env` (under its name or an
    older alias torch also reads) is left out, so the user's value stands."""
    if not (collective_timeout_s > 0 and math.isfinite(collective_timeout_s)):
        raise ValueError(f"collective_timeout_s must be a positive number of seconds, got {collective_timeout_s!r}")
    defaults = {
        # 2 = CleanUpOnly: abort the communicators, keep the process (torch's default 3 and torchelastic's 1
        # end the process on any collective timeout or NCCL error)
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
        # wait() stays a stream wait; blocking wait would poll the host every 1 ms inside every collective
        "TORCH_NCCL_BLOCKING_WAIT": "0",
        # no flight-recorder dump on a failure: every rank that sees the dump signal would end its process
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
        # the watchdog sleeps 4x this (default 4 x 15 s) between detecting a failure and aborting
        "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "250",
        # a watchdog stuck in a hung CUDA/NCCL call ends the process (the engine replaces it) ...
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        # ... after minutes, not torch's 8 (+8) minutes
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(max(60, math.ceil(3 * collective_timeout_s))),
    }
    return {
        name: value for name, value in defaults.items()
        if not any(n in user_env for n in (name, *NCCL_ENV_ALIASES.get(name, ())))
    }


SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def node_interface_env(
    ip: str, interfaces: Mapping[str, Iterable[str]], user_env: Mapping[str, str]
) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME naming the interface that holds `ip` (`interfaces`: name ->
    its addresses), for those of the two the user has not set; {} if no interface holds `ip`."""
    name = next((n for n, addresses in interfaces.items() if ip in addresses), None)
    if name is None:
        return {}
    return {var: name for var in SOCKET_IFNAME_VARS if var not in user_env}


def bind_collectives_to_node_interface() -> dict[str, str]:
    """gloo (and NCCL's bootstrap) bind to the hostname's address unless told an interface; point them at
    the interface holding this node's Ray address, so ranks on different hosts can reach each other. An
    interface the user chose (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) stays. Returns what it set."""
    interfaces = {name: [a.address for a in addresses] for name, addresses in psutil.net_if_addrs().items()}
    env = node_interface_env(ray.util.get_node_ip_address(), interfaces, os.environ)
    os.environ.update(env)
    return env
