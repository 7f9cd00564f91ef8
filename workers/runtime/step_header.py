"""The step header the attention rank broadcasts before each engine step: run a step of T tokens, keep
alive, or stop.

Expert ranks block on it; the keepalive lets an idle server stay inside the collective timeout. The token
count lets every rank size a step's single-collective dispatch alike (`workers.comm.single_source`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.comm.errors import CollectiveError


class Command(enum.IntEnum):
    STOP = 0
    STEP = 1
    KEEPALIVE = 2


@dataclass(frozen=True)
class StepHeader:
    command: Command
    num_tokens: int = 0  # tokens in the step (STEP only)


def broadcast_header(header: StepHeader | None, *, group: dist.ProcessGroup, device: torch.device) -> StepHeader:
    """Rank 0 passes its header; every other rank passes None and receives it."""
    sent = (int(header.command), header.num_tokens) if header is not None else (-1, -1)
    wire = torch.tensor(sent, dtype=torch.int64, device=device)  # [command, num_tokens]
    try:
        dist.broadcast(wire, src=0, group=group)
    except RuntimeError as exc:
        raise CollectiveError(f"step header broadcast failed on rank {dist.get_rank(group)}: {exc}") from exc
    command, num_tokens = wire.tolist()
    return StepHeader(Command(command), num_tokens)
