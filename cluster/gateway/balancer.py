"""The online expert balancer of a serving gateway (`--balance-interval`): it samples the rows the coordinators
routed to each (layer, expert) once a second, and every interval plans a placement from the last window of them
(cluster.expert_balance.propose); when the plan lowers the predicted imbalance by more than the threshold, the
engine moves the copies while serving (RayExpertParallelEngine.move_replicas: the workers read their new
experts beside their steps, then every rank switches at one step boundary).

The coordinators' counts are logical (per expert, whichever copy ran the rows) and outlive restarts, so a move
or a replaced worker does not disturb the window. One move at a time; none while the engine recovers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.errors import MoveFailed, WorkerUnavailable
from cluster.expert_balance import LoadWindow, Proposal, placement_cost, propose
from cluster.gateway.metrics import GatewayMetrics
from cluster.ray_engine import MoveReport, RayExpertParallelEngine

log = logging.getLogger(__name__)
SAMPLE_S = 1.0  # how often the window samples the routed-row counters


@dataclass(frozen=True, kw_only=True)
class BalancerSettings:
    interval_s: float = 0.0  # seconds between balancer runs; 0: off
    window_s: float = 300.0  # the routed rows a run plans from: the last window_s seconds of them
    threshold: float = 0.05  # move only when the predicted imbalance drops by more than this share

    def __post_init__(self) -> None:
        if self.interval_s < 0:
            raise ValueError(f"balance interval must be >= 0 seconds (0: off), got {self.interval_s}")
        if self.window_s < SAMPLE_S:
            raise ValueError(f"balance window must be >= {SAMPLE_S:g} s, got {self.window_s}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"balance threshold must be in [0, 1), got {self.threshold}")

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0


class ExpertBalancer:
    def __init__(self, engine: RayExpertParallelEngine, metrics: GatewayMetrics, settings: BalancerSettings,
                 *, recovering: Callable[[], bool] = lambda: False) -> None:
        """recovering(): whether the engine is being restarted now (no run then, nor while a failover onto
        surviving copies leaves a worker out: a move needs every worker)."""
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.recovering = recovering
        self.window = LoadWindow(settings.window_s)
        self.moves: list[MoveReport] = []  # the latest last

    async def run(self) -> None:
        """Samples every second and balances every interval, until cancelled."""
        next_run = time.monotonic() + self.settings.interval_s
        while True:
            self.window.add(time.monotonic(), self.metrics.routed_rows_LE())
            if time.monotonic() >= next_run:
                next_run = time.monotonic() + self.settings.interval_s
                if not (self.recovering() or self.engine.degraded):
                    await self.balance_once()
            await asyncio.sleep(SAMPLE_S)

    async def balance_once(self) -> Proposal | None:
        """One balancer run: plans from the window and moves when the plan pays; returns the plan it moved to."""
        self.metrics.balancer_runs.inc()
        rows_LE = self.window.rows(self.settings.window_s)
        if rows_LE is None or not any(map(any, rows_LE)):
            return None
        current = self.engine.placement
        proposal = propose(rows_LE, current, threshold=self.settings.threshold)
        if proposal is None:  # nothing pays: the placement stays, as predicted
            cost = placement_cost(rows_LE, current)
            self.metrics.set_predicted_imbalance(current=cost, proposed=cost)
            return None
        self.metrics.set_predicted_imbalance(current=proposal.cost_before, proposed=proposal.cost_after)
        try:
            report = await asyncio.to_thread(self.engine.move_replicas, proposal.parallel)
        except (MoveFailed, WorkerUnavailable) as exc:
            self.metrics.balancer_move_failures.inc()
            log.warning("balancer: the move failed (%s); serving on with the placement the engine reports", exc)
            return None
        self.moves.append(report)
        self.metrics.observe_move(report.moved_copies, report.seconds)
        log.info("balancer: moved %d expert copies in %.3f s (read beside serving %.3f s, switch %.3f s); predicted "
                 "imbalance %.2f -> %.2f", report.moved_copies, report.seconds, report.stage_s, report.switch_s,
                 proposal.cost_before, proposal.cost_after)
        return proposal
