"""The step header the attention rank broadcasts before each engine step: run a step of T tokens, keep
alive, or stop.

Expert ranks block on it; the keepalive lets an idle server stay inside the collective timeout. A STEP
header also carries the sender's decisions on how the step's rows travel: how many micro-batches each
layer's rows come in (ping-pong, workers.runtime.attention_rank), and per micro-batch its capacity:
> 0 sends counts and rows in one collective sized for that many rows (`workers.comm.single_source`), 0
exchanges split sizes first. The expert ranks never decide these themselves, so the two sides cannot
disagree.

Every header also carries the sender's placement epoch: the expert placement it is ready to use (a balancer
move stages the next placement on every rank beside serving, cluster.ray_engine). The epoch a plan runs at is
the lowest any coordinator sent, so every rank switches to a staged placement at the same exchange, before the
step's first collective: a step never mixes two placements.
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
    placement_epoch: int = 0  # the latest placement this coordinator has staged (every command)

    def __post_init__(self) -> None:
        if self.placement_epoch < 0:
            raise ValueError(f"placement_epoch must be >= 0, got {self.placement_epoch}")
        if self.num_tokens < 0 or any(c < 0 for c in self.capacities):
            raise ValueError(f"num_tokens ({self.num_tokens}) and capacities {self.capacities} must be >= 0")
        if len(self.capacities) > MAX_MICRO_BATCHES:
            raise ValueError(f"at most {MAX_MICRO_BATCHES} micro-batches a step, got {len(self.capacities)}")
        if self.command is Command.STEP and not self.capacities:
            raise ValueError("a STEP header needs a capacity per micro-batch (at least one)")


MAX_MICRO_BATCHES = 4


@dataclass(frozen=True)
class StepPlan:
    """What every rank learns from one header exchange: each coordinator's header, in rank order."""

    headers: tuple[StepHeader, ...]

    @property
    def command(self) -> Command:
        """STEP while any coordinator steps; STOP once every coordinator stops (one that stopped early joins
        its peers' steps with nothing to send); otherwise KEEPALIVE."""
        commands = {h.command for h in self.headers}
        if Command.STEP in commands:
            return Command.STEP
        return Command.STOP if commands == {Command.STOP} else Command.KEEPALIVE

    @property
    def placement_epoch(self) -> int:
        """The placement the step (or keepalive) runs with: the latest every coordinator has staged."""
        return min(h.placement_epoch for h in self.headers)

    @property
    def micro_batches(self) -> int:
        return max((len(h.capacities) for h in self.headers if h.command is Command.STEP), default=0)

    def capacity(self, micro_batch: int) -> int:
        """The micro-batch's single-collective capacity: the one coordinator's; 0 (split sizes first) with
        several, whose rows no fixed slot layout describes."""
        if len(self.headers) > 1:
            return 0
        capacities = self.headers[0].capacities
        return capacities[micro_batch] if micro_batch < len(capacities) else 0


def exchange_headers(
    header: StepHeader | None, *, group: dist.ProcessGroup, device: torch.device, num_coordinators: int
) -> StepPlan:
    """Every rank calls it once per step or keepalive: coordinators pass their header, expert ranks None.
    One all-gather; every rank returns the same plan."""
    # [command, placement epoch, num_tokens, micro-batches, capacity of each (0-padded)]
    width = 4 + MAX_MICRO_BATCHES
    if header is None:
        sent = [-1] * width
    else:
        capacities = list(header.capacities) + [0] * (MAX_MICRO_BATCHES - len(header.capacities))
        sent = [int(header.command), header.placement_epoch, header.num_tokens, len(header.capacities), *capacities]
    mine = torch.tensor(sent, dtype=torch.int64, device=device)  # [4 + MAX_MICRO_BATCHES]
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(everyone, mine, group=group)
    except RuntimeError as exc:
        raise CollectiveError(f"step header exchange failed on rank {dist.get_rank(group)}: {exc}") from exc
    headers = []
    for wire in everyone[:num_coordinators]:
        command, epoch, num_tokens, micro_batches, *capacities = wire.tolist()
        if command < 0:
            raise CollectiveError(f"a coordinator rank sent no header (group of {num_coordinators} coordinators?)")
        headers.append(StepHeader(command=Command(command), num_tokens=num_tokens,
                                  capacities=tuple(capacities[:micro_batches]), placement_epoch=epoch))
    return StepPlan(tuple(headers))
