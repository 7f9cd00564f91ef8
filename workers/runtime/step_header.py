"""The step header the attention rank broadcasts before each engine step: run a step of T tokens, keep
alive, or stop.

Expert ranks block on it; the keepalive lets an idle server stay inside the collective timeout. A STEP
header also carries the sender's one decision on how the step's rows travel: `capacity_rows` > 0 sends
counts and rows in one collective sized for that many rows (`workers.comm.single_source`), 0 exchanges
split sizes first. The expert ranks never decide it themselves, so the two sides cannot disagree.
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


@dataclass(frozen=True, kw_only=True)
class StepHeader:
    command: Command
    num_tokens: int = 0  # tokens in the step (STEP only)
    capacity_rows: int = 0  # rows each receiver's single-collective slot holds; 0: split sizes first (STEP only)

    def __post_init__(self) -> None:
        if self.num_tokens < 0 or self.capacity_rows < 0:
            raise ValueError(f"num_tokens ({self.num_tokens}) and capacity_rows ({self.capacity_rows}) must be >= 0")


def broadcast_header(header: StepHeader | None, *, group: dist.ProcessGroup, device: torch.device) -> StepHeader:
    """Rank 0 passes its header; every other rank passes None and receives it."""
    sent = (int(header.command), header.num_tokens, header.capacity_rows) if header is not None else (-1, -1, -1)
    wire = torch.tensor(sent, dtype=torch.int64, device=device)  # [command, num_tokens, capacity_rows]
    try:
        dist.broadcast(wire, src=0, group=group)
    except RuntimeError as exc:
        raise CollectiveError(f"step header broadcast failed on rank {dist.get_rank(group)}: {exc}") from exc
    command, num_tokens, capacity_rows = wire.tolist()
    return StepHeader(command=Command(command), num_tokens=num_tokens, capacity_rows=capacity_rows)
