"""The attention rank's MoE backend when experts live on other ranks: dispatch → (remote experts) → combine.

The attention rank holds no expert; it sends each (token, expert) row to the expert's rank and weights
the returned rows by the router. Once per step, in `begin_step`, it says in its step header how many
micro-batches its rows come in and, per micro-batch, whether they go with their counts in one collective
(small ones, and every one with one expert worker) or after a split-size exchange. With several
coordinators (ParallelConfig.num_coordinators) every coordinator's header is exchanged and all of them run
the step's collectives in lockstep: the most micro-batches any of them asked for, split sizes first, and a
coordinator with nothing (or less) to send joins with empty micro-batches (`keepalive`, `stop`).
`start_moe` issues a micro-batch's dispatch and combine without waiting (workers.comm.overlap), so the
attention rank can compute the next micro-batch while the experts work. An expert with several copies
(redundant experts) gets its rows split between them by count (workers.runtime.replicas). A balancer move
stages the next placement (`stage`, from any thread); every header carries the latest staged epoch, and the
coordinator switches its replica table at the exchange whose plan runs at it, like the expert ranks.
Shapes: T tokens, K top-k, N = T*K rows, D model dim.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from workers.comm import PendingRows, fixed_capacity_rows, send_from_source
from workers.config import ParallelConfig
from workers.model.experts import weight_and_sum
from workers.runtime.replicas import ReplicaTable
from workers.runtime.step_header import Command, StepHeader, StepPlan, exchange_headers
from workers.runtime.timing import StepTimings


@dataclass(eq=False)
class PendingMoE:
    """One micro-batch's MoE output on its way back from the expert ranks."""

    rows: PendingRows
    weights_TK: torch.Tensor

    def wait(self, timings: StepTimings) -> torch.Tensor:
        """The weighted expert output [T, D]; the wait is timed as `combine` (experts and transfer not hidden)."""
        with timings.phase("combine"):
            y_ND = self.rows.wait()
            if not len(self.weights_TK):  # an empty micro-batch (see start_empty)
                return y_ND
            return weight_and_sum(y_ND, self.weights_TK)


class DistributedExperts:
    overlaps = True  # start_moe returns before the experts have run

    def __init__(
        self, parallel: ParallelConfig, *, group: dist.ProcessGroup, device: torch.device, top_k: int, row_bytes: int,
        num_layers: int = 0, hidden_size: int = 0, dtype: torch.dtype = torch.float32,
    ) -> None:
        """top_k: experts per token; row_bytes: bytes of one routed row (hidden size x dtype size);
        num_layers, hidden_size, dtype: the shape of an empty step, which a coordinator with nothing to send
        runs when its peers step (needed only with several coordinators)."""
        self.parallel = parallel
        self.num_layers, self.hidden_size, self.dtype = num_layers, hidden_size, dtype
        self.group = group
        self.device = device
        self.top_k = top_k
        self.row_bytes = row_bytes
        self.replicas = ReplicaTable.from_parallel(parallel, device)  # where each copy of each expert lives
        self.max_local_experts = parallel.max_local_experts  # e_max (derived from the placement: computed once)
        self.coordinator = dist.get_rank(group)  # rotates the replica split with the layer and micro-batch
        self.receivers = parallel.worker_ranks
        self.capacities: tuple[int, ...] = ()  # this step's, one per micro-batch of the step's plan
        self.exchanges = 0  # header exchanges so far: every coordinator joins each, so the counts agree
        self.placement_epoch = 0  # placements switched to in this group
        self._staged: tuple[int, ParallelConfig] | None = None  # (epoch, placement) not yet switched to
        self._stage_lock = threading.Lock()

    def stage(self, epoch: int, parallel: ParallelConfig) -> None:
        """From any thread: the placement to switch to once every coordinator has staged `epoch` (the expert
        ranks must have staged their shards of it first). Same ranks; only where the copies live changes."""
        if (parallel.num_coordinators, parallel.num_workers) != (self.parallel.num_coordinators,
                                                                  self.parallel.num_workers):
            raise ValueError(f"a move keeps the ranks: {parallel.num_coordinators} coordinators x "
                             f"{parallel.num_workers} workers staged on {self.parallel.num_coordinators} x "
                             f"{self.parallel.num_workers}")
        if epoch <= self.placement_epoch:
            raise ValueError(f"placement epoch {epoch} is not after the current {self.placement_epoch}")
        with self._stage_lock:
            self._staged = (epoch, parallel)

    def _switch_to(self, epoch: int) -> None:
        with self._stage_lock:
            staged, self._staged = self._staged, None
        assert staged is not None and staged[0] == epoch, f"plan at epoch {epoch}, staged {staged}"
        self.parallel = staged[1]
        self.replicas = ReplicaTable.from_parallel(self.parallel, self.device)
        self.max_local_experts = self.parallel.max_local_experts
        self.placement_epoch = epoch

    def begin_step(self, micro_batch_tokens: tuple[int, ...]) -> int:
        """Sends this step's header; returns the step's micro-batch count, which with several coordinators
        may exceed len(micro_batch_tokens): the caller then starts empty micro-batches (`start_empty`)."""
        max_padded = self.parallel.single_collective_max_bytes if self.parallel.num_coordinators == 1 else 0
        capacities = tuple(
            fixed_capacity_rows(num_tokens=tokens, top_k=self.top_k, row_bytes=self.row_bytes,
                                num_receivers=len(self.receivers), max_padded_bytes=max_padded)
            for tokens in micro_batch_tokens
        )
        plan = self._exchange(StepHeader(command=Command.STEP, num_tokens=sum(micro_batch_tokens),
                                         capacities=capacities))
        self.capacities = tuple(plan.capacity(i) for i in range(plan.micro_batches))
        return plan.micro_batches

    def keepalive(self) -> bool:
        """Idle: keeps the group inside its collective timeout, and joins any step a peer coordinator runs;
        returns whether it did (the peer may well step again next)."""
        plan = self._exchange(StepHeader(command=Command.KEEPALIVE))
        if plan.command is Command.STEP:
            self._empty_step(plan)
        return plan.command is Command.STEP

    def stop(self) -> None:
        """Tells the expert ranks to stop once every coordinator has (joining its peers' steps until then)."""
        while (plan := self._exchange(StepHeader(command=Command.STOP))).command is not Command.STOP:
            if plan.command is Command.STEP:
                self._empty_step(plan)

    def _exchange(self, header: StepHeader) -> StepPlan:
        self.exchanges += 1
        with self._stage_lock:
            ready = self._staged[0] if self._staged is not None else self.placement_epoch
        plan = exchange_headers(replace(header, placement_epoch=ready), group=self.group, device=self.device,
                                num_coordinators=self.parallel.num_coordinators)
        if plan.placement_epoch != self.placement_epoch:
            self._switch_to(plan.placement_epoch)
        return plan

    @property
    def staged_epoch(self) -> int | None:
        """The epoch staged and not yet switched to (None: none)."""
        with self._stage_lock:
            return self._staged[0] if self._staged is not None else None

    def _empty_step(self, plan: StepPlan) -> None:
        """A step of this coordinator's with no tokens: every layer's collectives of every micro-batch."""
        self.capacities = tuple(plan.capacity(i) for i in range(plan.micro_batches))
        for layer in range(self.num_layers):
            for micro_batch in range(plan.micro_batches):
                self.start_empty(layer, micro_batch).rows.wait()

    def start_empty(self, layer: int, micro_batch: int) -> PendingMoE:
        """Micro-batch `micro_batch` of `layer` with no rows from this coordinator."""
        nothing_TD = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        no_ids_TK = torch.empty(0, self.top_k, dtype=torch.int64, device=self.device)
        return self.start_moe(layer, micro_batch, nothing_TD, nothing_TD.new_empty(0, self.top_k), no_ids_TK,
                              StepTimings.for_device(self.device))

    def start_moe(
        self, layer: int, micro_batch: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
        timings: StepTimings,
    ) -> PendingMoE:
        """Sends micro-batch `micro_batch`'s rows of `layer` to the experts; the caller must start every
        micro-batch of a layer, in order, before the next layer's first (the expert ranks' order)."""
        top_k = ids_TK.shape[1]
        assert top_k == self.top_k, f"ids_TK has {top_k} experts per token, begin_step sized the step for {self.top_k}"
        with timings.phase("dispatch"):
            ids_N = ids_TK.reshape(-1)
            x_ND = x_TD.repeat_interleave(top_k, dim=0)  # row n is token n // K
            rank_N, local_index_N = self.replicas.destinations(  # a replicated expert's rows split over its copies
                ids_N, rotation=layer + micro_batch + self.coordinator)
            rows = send_from_source(
                x_ND, rank_N, local_index_N, group=self.group,
                num_local_experts_max=self.max_local_experts, capacity=self.capacities[micro_batch],
                receivers=self.receivers,
            )
        return PendingMoE(rows, weights_TK)
