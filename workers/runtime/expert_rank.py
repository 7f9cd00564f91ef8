"""The expert rank's SPMD loop: wait for a step header, then for each layer receive rows, run the local
experts (one matmul pair per expert over all its rows, which arrive grouped by expert: only the attention
rank sends), and send the rows back.

Driven entirely by the collectives of the attention ranks; knows nothing of requests or tokens. Rows
arrive the way the attention ranks chose to send them, which the step plan says: per layer in one or more
micro-batches (ping-pong), each with its counts in one collective sized for its capacity, or after a
split-size exchange when that is 0 (always with several coordinators, whose rows arrive by source and are
regrouped by expert here).

A balancer move (cluster.ray_engine) hands the rank its next shard beside serving (`stage`); the rank switches
to it at the exchange whose plan first runs at that placement epoch (workers.runtime.step_header), before the
step's first collective, and drops the old shard's tensors.
Shapes: M rows received, D model dim, e local experts, L layers, E experts of the model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.comm import combine, counts_if_grouped, dispatch_step
from workers.comm.errors import DispatchError
from workers.comm.plan import unpermute
from workers.model.experts import run_grouped_experts
from workers.model.weights import ExpertShard
from workers.runtime.step_header import Command, exchange_headers
from workers.runtime.timing import StepTimings


@dataclass(frozen=True)
class StagedShard:
    """The shard of a placement epoch not yet switched to, and that placement's e_max."""

    epoch: int
    shard: ExpertShard
    max_local_experts: int


class ExpertRank:
    def __init__(
        self, shard: ExpertShard, *, group: dist.ProcessGroup, device: torch.device, max_local_experts: int,
        hidden_size: int, num_coordinators: int, num_experts: int,
    ) -> None:
        self.shard = shard
        self.group = group
        self.device = device
        self.max_local_experts = max_local_experts
        self.hidden_size = hidden_size
        self.num_coordinators = num_coordinators
        self.receivers = tuple(range(num_coordinators, dist.get_world_size(group)))
        self.dtype = shard.layers[0].dtype
        self.timings = StepTimings.for_device(device)
        self.steps = 0
        self.placement_epoch = 0  # placements switched to in this group (a move's epoch, workers.runtime.step_header)
        self._staged: StagedShard | None = None
        self._stage_lock = threading.Lock()
        # [L, E]: rows each expert's copy here has run, by global expert id (survives a move)
        self.rows_per_expert = torch.zeros(len(shard.layers), num_experts, dtype=torch.int64)

    def stage(self, epoch: int, shard: ExpertShard, max_local_experts: int) -> None:
        """From any thread: the shard to switch to when the coordinators' plan reaches `epoch`."""
        if epoch <= self.placement_epoch:
            raise ValueError(f"placement epoch {epoch} is not after the current {self.placement_epoch}")
        with self._stage_lock:
            self._staged = StagedShard(epoch, shard, max_local_experts)

    def _switch_to(self, epoch: int) -> None:
        with self._stage_lock:
            staged, self._staged = self._staged, None
        if staged is None or staged.epoch != epoch:
            raise DispatchError(f"the coordinators switch to placement epoch {epoch}, but this rank staged "
                                f"{staged.epoch if staged else 'none'} (at {self.placement_epoch})")
        self.shard, self.max_local_experts, self.placement_epoch = staged.shard, staged.max_local_experts, epoch

    def run(self) -> None:
        """Serve steps until every attention rank says STOP; a failed collective raises CollectiveError."""
        while True:
            plan = exchange_headers(None, group=self.group, device=self.device, num_coordinators=self.num_coordinators)
            if plan.placement_epoch != self.placement_epoch:
                self._switch_to(plan.placement_epoch)
            if plan.command is Command.STOP:
                return
            if plan.command is Command.STEP:
                for layer in range(len(self.shard.layers)):
                    for micro_batch in range(plan.micro_batches):  # in the order the coordinators send them
                        self._layer(layer, plan.capacity(micro_batch))
                self.steps += 1

    def _layer(self, layer: int, capacity: int) -> None:
        nothing_ND = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        no_ids_N = torch.empty(0, dtype=torch.int64, device=self.device)
        with self.timings.phase("dispatch"):
            recv_x_MD, plan = dispatch_step(
                nothing_ND, no_ids_N, no_ids_N, group=self.group, num_local_experts_max=self.max_local_experts,
                capacity=capacity, receivers=self.receivers,
            )
        with self.timings.phase("experts"):
            num_local = len(self.shard.expert_ids)
            counts_e = counts_if_grouped(plan, num_local_experts=num_local)
            if counts_e is not None:  # one sender: the rows arrive grouped by expert
                y_MD = run_grouped_experts(recv_x_MD, counts_e, self.shard.layers[layer])
            else:  # several coordinators: by source, then by expert; regroup, run, put back
                counts_RE = plan.recv_counts_RE  # [R, e_max]
                if counts_RE[:, num_local:].any():
                    raise DispatchError(f"rows for local experts beyond this rank's {num_local}: {counts_RE.tolist()}")
                expert_M = torch.arange(counts_RE.shape[1], device=self.device).repeat(counts_RE.shape[0])
                expert_M = expert_M.repeat_interleave(counts_RE.reshape(-1))  # [M]: each row's local expert
                order_M = torch.argsort(expert_M, stable=True)
                counts_e = counts_RE.sum(0)[:num_local].tolist()
                y_MD = unpermute(run_grouped_experts(recv_x_MD[order_M], counts_e, self.shard.layers[layer]), order_M)
            self.rows_per_expert[layer, list(self.shard.expert_ids)] += torch.tensor(counts_e)
        with self.timings.phase("combine"):
            combine(y_MD, plan, group=self.group)
