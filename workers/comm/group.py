"""Process-group setup for one rank of the expert-parallel group.

One process per rank (later each is a Ray actor): the caller passes every setting explicitly and gets
a `ProcessGroupHandle` to pass on to `dispatch_step` / `combine`; nothing here reads the environment.
Every group gets a timeout, so a dead or stuck peer turns a collective into `CollectiveError` instead
of a hang. This module knows nothing about models or experts.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from workers.comm.errors import CollectiveError, GroupConfigError

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True, kw_only=True, eq=False)
class ProcessGroupHandle:
    """The group of this process, the device its tensors must live on, and how to tear it down."""

    group: dist.ProcessGroup
    backend: str
    device: torch.device
    rank: int
    world_size: int
    timeout_s: float

    def destroy(self) -> None:
        """Tears the group down; a no-op if it is already gone (idempotent)."""
        if dist.is_initialized() and dist.group.WORLD is self.group:
            dist.destroy_process_group(self.group)


def create_group(
    *,
    backend: str,
    init_method: str,
    rank: int,
    world_size: int,
    timeout_s: float,
    device: torch.device | None = None,
) -> ProcessGroupHandle:
    """Joins the rendezvous at `init_method` (tcp://host:port) as `rank` of `world_size`.

    `device` defaults to CPU for gloo and the current CUDA device for NCCL. Raises `GroupConfigError`
    for bad arguments and `CollectiveError` if the peers do not all arrive within `timeout_s`.
    """
    _check_args(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size, timeout_s=timeout_s
    )
    if dist.is_initialized():
        raise GroupConfigError("this process already belongs to a process group; destroy() it first")
    if device is None and backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    elif device is None:
        device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    except (RuntimeError, TimeoutError) as exc:  # DistStoreError / DistNetworkError, gloo RuntimeError
        raise CollectiveError(
            f"rank {rank} of {world_size} could not join the {backend} group at {init_method} "
            f"within {timeout_s}s: {exc}"
        ) from exc
    return ProcessGroupHandle(
        group=dist.group.WORLD,
        backend=backend,
        device=device,
        rank=rank,
        world_size=world_size,
        timeout_s=timeout_s,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (another process may still take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_args(*, backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
    if backend not in BACKENDS:
        raise GroupConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not init_method.startswith("tcp://") or ":" not in init_method.removeprefix("tcp://"):
        raise GroupConfigError(f"init_method must look like tcp://host:port, got {init_method!r}")
    if world_size < 1:
        raise GroupConfigError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise GroupConfigError(f"rank ({rank}) is outside [0, world_size={world_size})")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise GroupConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise GroupConfigError("backend 'nccl' needs a CUDA device, but torch.cuda.is_available() is False")
