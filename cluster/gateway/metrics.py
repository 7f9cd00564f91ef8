"""Prometheus metrics of the gateway, in their own registry (no global state), served on their own port.

Label values are bounded: the API (grpc, http), finish reasons, gRPC status names, phases, layer and expert
indices, worker and coordinator indices. Never request ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cluster.engine_stats import StatsSnapshot
from workers.runtime.timing import PHASES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GatewayMetrics:
    def __init__(self, *, num_layers: int, num_experts: int, num_workers: int, num_coordinators: int = 1) -> None:
        """num_workers: the expert workers (0: every expert in the coordinator, and no per-worker series)."""
        self.registry = CollectorRegistry()
        self.expert_workers = num_workers
        self._worker_seconds: list[dict[str, float]] = []  # the workers' cumulative phase seconds, last read
        self._worker_rows: list[list[list[int]]] = []  # the workers' cumulative rows [worker][layer][expert]
        self._routed_LE = [[0] * num_experts for _ in range(num_layers)]  # rows the coordinators routed, cumulative
        r = self.registry
        self.requests = Counter("mixserve_requests", "Finished requests by API (grpc, http), finish reason and gRPC "
                                "status name (an HTTP error counts as the status it maps to)",
                                ["api", "finish_reason", "code"], registry=r)
        self.prompt_tokens = Counter("mixserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("mixserve_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("mixserve_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mixserve_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mixserve_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("mixserve_request_queue_time_seconds", "Time from arrival to first scheduling",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("mixserve_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.phase = Histogram("mixserve_step_phase_seconds", "Engine step time by phase", ["phase"],
                               buckets=STEP_BUCKETS, registry=r)
        self.running = Gauge("mixserve_num_requests_running", "Requests in the running batch, per coordinator",
                             ["coordinator"], registry=r)
        self.waiting = Gauge("mixserve_num_requests_waiting", "Requests waiting for admission, per coordinator",
                             ["coordinator"], registry=r)
        self.kv_usage = Gauge("mixserve_kv_cache_usage_ratio", "Fraction of the coordinator's KV-cache blocks in use",
                              ["coordinator"], registry=r)
        self.coordinator_up = Gauge("mixserve_coordinator_up", "1 while the coordinator (attention rank) serves",
                                    ["coordinator"], registry=r)
        self.num_coordinators = Gauge("mixserve_num_coordinators", "Configured coordinators", registry=r)
        self.placed_requests = Counter("mixserve_coordinator_placed_requests", "Request attempts the gateway placed "
                                       "on each coordinator (replays included)", ["coordinator"], registry=r)
        self.worker_phase = Counter("mixserve_worker_phase_seconds", "Expert workers' own step time by phase "
                                    "(dispatch: waiting for and receiving rows, experts, combine: sending back)",
                                    ["worker", "phase"], registry=r)
        self.preemptions = Counter("mixserve_preemptions", "Running sequences evicted to free KV blocks (recomputed "
                                   "later)", registry=r)
        self.prefix_cache_queries = Counter("mixserve_prefix_cache_query_tokens", "Tokens of admitted sequences "
                                            "looked up in the prefix cache", registry=r)
        self.prefix_cache_hits = Counter("mixserve_prefix_cache_hit_tokens", "Looked-up tokens whose cached KV "
                                         "blocks were reused instead of computed", registry=r)
        self.expert_tokens = Counter("mixserve_expert_routed_tokens", "Token rows routed to each expert",
                                     ["layer", "expert"], registry=r)
        self.worker_tokens = Counter("mixserve_worker_routed_tokens", "Token rows each expert worker computed, as it "
                                     "counts them (read about once a second)", ["worker"], registry=r)
        self.replica_rows = Counter("mixserve_expert_replica_rows", "Rows each physical expert copy computed, as "
                                    "its worker counts them", ["layer", "expert", "worker"], registry=r)
        self.imbalance = Gauge("mixserve_expert_worker_imbalance_ratio", "Per layer, the busiest expert worker's rows "
                               "over the mean worker's, over the gateway's last read of the workers (about 1 s) "
                               "that saw rows; 1 is balanced", ["layer"], registry=r)
        self.balancer_runs = Counter("mixserve_balancer_runs", "Expert balancer runs (--balance-interval)", registry=r)
        self.balancer_moves = Counter("mixserve_balancer_moves", "Placement moves the expert balancer made",
                                      registry=r)
        self.balancer_moved_copies = Counter("mixserve_balancer_moved_copies", "Expert copies workers read for the "
                                             "balancer's moves", registry=r)
        self.balancer_move_failures = Counter("mixserve_balancer_move_failures", "Balancer moves that did not happen "
                                              "(a rank could not stage or switch)", registry=r)
        self.balancer_move_seconds = Histogram("mixserve_balancer_move_seconds", "One move: the workers read their "
                                               "new experts beside serving, then every rank switches at a step "
                                               "boundary", buckets=LATENCY_BUCKETS, registry=r)
        self.predicted_imbalance = Gauge("mixserve_balancer_predicted_imbalance", "The balancer's last prediction "
                                         "over its window: the busiest worker's rows summed over layers, over the "
                                         "mean worker's (1 is balanced), for the current placement and the one it "
                                         "planned; 0 until a run saw rows", ["placement"], registry=r)
        self.worker_up = Gauge("mixserve_worker_up", "1 while the expert worker serves", ["worker"], registry=r)
        self.num_workers = Gauge("mixserve_num_expert_workers", "Configured expert workers", registry=r)
        self.worker_failures = Counter("mixserve_worker_failures", "Expert worker failures detected", registry=r)
        self.worker_recoveries = Counter("mixserve_worker_recoveries", "Recoveries after a worker failure",
                                         registry=r)
        self.copy_failovers = Counter("mixserve_copy_failovers", "Failures served on at once by the surviving "
                                      "copies of the dead workers' experts (the group re-formed without them, "
                                      "nothing loaded first)", registry=r)
        self.worker_rejoins = Counter("mixserve_worker_rejoins", "Replacements of left-out workers that joined the "
                                      "group after loading beside serving (a planned pause; streams replayed)",
                                      registry=r)
        self.workers_left_out = Gauge("mixserve_expert_workers_left_out", "Expert workers the group runs without, "
                                      "their experts served by copies on the others", registry=r)
        self.request_replays = Counter("mixserve_request_replays", "In-flight requests resubmitted to a recovered "
                                       "engine, continuing from the tokens already streamed", registry=r)
        self.recovery_seconds = Histogram("mixserve_recovery_seconds", "Time from a detected engine failure until "
                                          "the engine serves again (restart, replay, probe step)",
                                          buckets=RECOVERY_BUCKETS, registry=r)
        self.num_workers.set(num_workers)
        self.num_coordinators.set(num_coordinators)
        for coordinator in map(str, range(num_coordinators)):
            for gauge in (self.running, self.waiting, self.kv_usage, self.coordinator_up):
                gauge.labels(coordinator=coordinator).set(0)
            self.placed_requests.labels(coordinator=coordinator)
        for placement in ("current", "proposed"):
            self.predicted_imbalance.labels(placement=placement).set(0)
        for phase in PHASES:
            self.phase.labels(phase=phase)
        for layer in range(num_layers):
            for expert in range(num_experts):
                self.expert_tokens.labels(layer=str(layer), expert=str(expert))
        for worker in range(num_workers):
            self.worker_tokens.labels(worker=str(worker))
            self.worker_up.labels(worker=str(worker)).set(0)

    def observe_stats(self, stats: StatsSnapshot, *, coordinator: int = 0) -> None:
        self.preemptions.inc(stats.preemptions)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.running.labels(coordinator=str(coordinator)).set(stats.num_running)
        self.waiting.labels(coordinator=str(coordinator)).set(stats.num_waiting)
        self.kv_usage.labels(coordinator=str(coordinator)).set(stats.kv_cache_usage)
        for size in stats.batch_sizes:
            self.batch.observe(size)
        for step in stats.phase_seconds:
            for phase, seconds in step.items():
                if seconds > 0:
                    self.phase.labels(phase=phase).observe(seconds)
        for layer, row in enumerate(stats.routed_tokens_LE):
            for expert, count in enumerate(row):
                if count:
                    self.expert_tokens.labels(layer=str(layer), expert=str(expert)).inc(count)
                    self._routed_LE[layer][expert] += count

    def routed_rows_LE(self) -> list[list[int]]:
        """Rows the coordinators routed to each (layer, expert) since the gateway started (a copy)."""
        return [list(row) for row in self._routed_LE]

    def set_predicted_imbalance(self, *, current: float, proposed: float) -> None:
        self.predicted_imbalance.labels(placement="current").set(current)
        self.predicted_imbalance.labels(placement="proposed").set(proposed)

    def observe_move(self, moved_copies: int, seconds: float) -> None:
        self.balancer_moves.inc()
        self.balancer_moved_copies.inc(moved_copies)
        self.balancer_move_seconds.observe(seconds)

    def count_request(self, *, finish_reason: str, code: str, api: str = "grpc") -> None:
        """One finished or rejected request; `api` is "grpc" or "http"."""
        self.requests.labels(api=api, finish_reason=finish_reason, code=code).inc()

    def observe_finished(self, *, finish_reason: str, code: str, prompt_tokens: int, completion_tokens: int,
                         api: str = "grpc") -> None:
        self.count_request(finish_reason=finish_reason, code=code, api=api)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def set_ranks_up(self, *, coordinators: list[bool], workers: list[bool]) -> None:
        for coordinator, alive in enumerate(coordinators):
            self.coordinator_up.labels(coordinator=str(coordinator)).set(1 if alive else 0)
        for worker, alive in enumerate(workers):
            self.worker_up.labels(worker=str(worker)).set(1 if alive else 0)

    def set_worker_phase_seconds(self, cumulative: list[dict[str, float]]) -> None:
        """Advances the workers' phase counters to their cumulative seconds; a worker whose seconds went down
        was replaced, and its new total counts from zero."""
        previous = self._worker_seconds if len(self._worker_seconds) == len(cumulative) else [{} for _ in cumulative]
        for worker, (before, now) in enumerate(zip(previous, cumulative, strict=True)):
            for phase, seconds in now.items():
                gained = seconds - before.get(phase, 0.0)
                self.worker_phase.labels(worker=str(worker), phase=phase).inc(gained if gained >= 0 else seconds)
        self._worker_seconds = [dict(s) for s in cumulative]

    def set_worker_rows(self, cumulative: list[list[list[int]]]) -> None:
        """Advances the per-copy and per-worker row counters to the workers' cumulative rows [worker][layer][expert]
        (a worker counts the rows of the experts it holds, whichever placement held them) and sets each layer's
        imbalance from what the read added; a worker whose rows went down was replaced."""
        if len(cumulative) != self.expert_workers:
            return
        previous = self._worker_rows if len(self._worker_rows) == len(cumulative) else [[] for _ in cumulative]
        gained_LW: dict[int, list[int]] = {}
        for worker, (before, now) in enumerate(zip(previous, cumulative, strict=True)):
            for layer, rows in enumerate(now):
                old = before[layer] if layer < len(before) and len(before[layer]) == len(rows) else [0] * len(rows)
                added = [n - o for n, o in zip(rows, old, strict=True)]
                if any(a < 0 for a in added):
                    added = list(rows)
                gained_LW.setdefault(layer, [0] * len(cumulative))[worker] = sum(added)
                for expert, count in enumerate(added):
                    if count:
                        self.replica_rows.labels(layer=str(layer), expert=str(expert), worker=str(worker)).inc(count)
        for layer, per_worker in gained_LW.items():
            if sum(per_worker):
                self.imbalance.labels(layer=str(layer)).set(max(per_worker) * len(per_worker) / sum(per_worker))
        for worker in range(len(cumulative)):
            gained = sum(per_worker[worker] for per_worker in gained_LW.values())
            self.worker_tokens.labels(worker=str(worker)).inc(gained)
        self._worker_rows = [[list(r) for r in w] for w in cumulative]
