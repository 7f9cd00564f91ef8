"""The step header the attention rank broadcasts before each engine step: run a step, keep alive, or stop.

Expert ranks block on it; the keepalive lets an idle server stay inside the collective timeout.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist

from workers.comm.errors import CollectiveError


class Command(enum.IntEnum):
    STOP = 0
    STEP = 1
    KEEPALIVE = 2


def broadcast_command(command: Command | None, *, group: dist.ProcessGroup, device: torch.device) -> Command:
    """Rank 0 passes its command; every other rank passes None and receives it."""
    header = torch.tensor([int(command) if command is not None else -1], dtype=torch.int64, device=device)
    try:
        dist.broadcast(header, src=0, group=group)
    except RuntimeError as exc:
        raise CollectiveError(f"step header broadcast failed on rank {dist.get_rank(group)}: {exc}") from exc
    return Command(int(header.item()))
