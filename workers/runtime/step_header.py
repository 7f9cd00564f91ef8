"""The step header the attention rank broadcasts before each engine step: run a step of T tokens, keep
alive, or stop.

Expert ranks block on it; the keepalive lets an idle server stay inside the collective timeout. A STEP
header also carries the sender's decisions on how the step's rows travel: how many micro-batches each
layer's rows come in (ping-pong, workers.runtime.attention_rank), and per micro-batch its capacity:
> 0 sends counts and rows in one collective sized for that many rows (`workers.comm.single_source`), 0
exchanges split sizes first. The expert ranks never decide these themselves, so the two sides cannot
disagree.
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
    # STEP only, one per micro-batch in the order each layer sends them: the rows each receiver's
    # single-collective slot holds, 0 for split sizes first
    capacities: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_tokens < 0 or any(c < 0 for c in self.capacities):
            raise ValueError(f"num_tokens ({self.num_tokens}) and capacities {self.capacities} must be >= 0")
        if len(self.capacities) > MAX_MICRO_BATCHES:
            raise ValueError(f"at most {MAX_MICRO_BATCHES} micro-batches a step, got {len(self.capacities)}")
        if self.command is Command.STEP and not self.capacities:
            raise ValueError("a STEP header needs a capacity per micro-batch (at least one)")


MAX_MICRO_BATCHES = 4


def broadcast_header(header: StepHeader | None, *, group: dist.ProcessGroup, device: torch.device) -> StepHeader:
    """Rank 0 passes its header; every other rank passes None and receives it."""
    width = 3 + MAX_MICRO_BATCHES  # [command, num_tokens, micro-batches, capacity of each (0-padded)]
    if header is None:
        sent = [-1] * width
    else:
        capacities = list(header.capacities) + [0] * (MAX_MICRO_BATCHES - len(header.capacities))
        sent = [int(header.command), header.num_tokens, len(header.capacities), *capacities]
    wire = torch.tensor(sent, dtype=torch.int64, device=device)  # [3 + MAX_MICRO_BATCHES]
    try:
        dist.broadcast(wire, src=0, group=group)
    except RuntimeError as exc:
        raise CollectiveError(f"step header broadcast failed on rank {dist.get_rank(group)}: {exc}") from exc
    command, num_tokens, micro_batches, *capacities = wire.tolist()
    return StepHeader(command=Command(command), num_tokens=num_tokens, capacities=tuple(capacities[:micro_batches]))
