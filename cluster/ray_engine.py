"""The expert-parallel engine on Ray: a placement group, one Coordinator actor (rank 0, attention and
the engine loop) and N ExpertWorker actors (ranks 1..N), joined in one torch.distributed group.

Assumes Ray is already initialised by the entry point (a local cluster or `ray start` nodes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import Coordinator, ExpertWorker, RankSettings, WorkerStartError
from cluster.allocator import MallocSettings
from cluster.engine_factory import num_kv_blocks
from cluster.engine_stats import StatsSnapshot, merge_snapshots
from cluster.errors import WorkerUnavailable
from cluster.placement import contiguous_placement
from cluster.requests import GenerationRequest, GenerationResult, SequenceUpdate
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from cluster.update_channel import ChannelClosed, UpdateBatch, UpdateSubscription
from workers.config import ModelConfig, ParallelConfig

log = logging.getLogger(__name__)
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    num_workers: int
    placement_strategy: str = "PACK"
    cpus_per_rank: float = 1.0
    threads_per_rank: int | None = None
    collective_timeout_s: float = 20.0
    start_timeout_s: float = 180.0
    # Ranks sharing a host take turns; libgomp's default keeps a rank's OpenMP threads spinning ~3 ms
    # after each parallel region, on the cores the next rank needs. Every rank that shares its host gets
    # this spin count (GOMP_SPINCOUNT; 100 is libgomp's own value for oversubscribed hosts); None keeps
    # the default. Measured with 1 worker on 2 cores (W1 / W2 offline): default 300k spins 20.1-21.7 s
    # on W2; 10,000: 4.9-5.8 s / 17.3-17.9 s; 100: 3.5-3.8 s / 16.3-16.8 s.
    shared_host_spin_count: int | None = 100
    # glibc malloc settings every rank process starts with (see cluster.allocator); None keeps glibc's own
    malloc: MallocSettings | None = field(default_factory=MallocSettings)
    # Ranks on the driver's host (where `mixserve serve` runs the gateway) use this many fewer torch threads
    # (at least 1), so the gateway's streaming does not pre-empt their OpenMP teams mid-region (vLLM's CPU
    # backend reserves a core for its API server the same way: VLLM_CPU_NUM_OF_RESERVED_CPU).
    reserved_cpus: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.reserved_cpus < 0:
            raise ValueError(f"reserved_cpus must be >= 0, got {self.reserved_cpus}")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {STRATEGIES}, got {self.placement_strategy!r}")


class RayExpertParallelEngine:
    def __init__(
        self, settings: EngineSettings, options: ClusterOptions, scheduler: SchedulerConfig | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.scheduler = scheduler or SchedulerConfig()
        self.cfg = ModelConfig.from_model_dir(settings.model_dir)
        self.placement = contiguous_placement(self.cfg.num_local_experts, max(options.num_workers, 1))
        self.parallel = None
        if options.num_workers:
            self.parallel = ParallelConfig(
                worker_of_expert=self.placement.worker_of_expert, collective_timeout_s=options.collective_timeout_s
            )
        self.pg = None
        self.coordinator = None
        self.workers: list = []
        self.worker_runs: list = []
        self.rendezvous: str | None = None
        self.restarts = 0
        self._subscription: UpdateSubscription | None = None
        self._lifecycle = threading.RLock()

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._place()
            self._load_all()
            self._join_all()
        except BaseException:
            self.shutdown()
            raise

    def _bundle(self) -> dict[str, float]:
        gpu = self.settings.device.type == "cuda"
        return {"CPU": self.options.cpus_per_rank} | ({"GPU": 1.0} if gpu else {})

    def _place(self) -> None:
        world = self.options.num_workers + 1
        self.pg = placement_group([self._bundle()] * world, strategy=self.options.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=self.options.start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise WorkerStartError(
                f"placement group of {world} bundles {self._bundle()} did not fit the cluster within "
                f"{self.options.start_timeout_s}s (available: {ray.available_resources()})"
            ) from exc
        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        # The coordinator and the expert workers take turns (each waits in a collective while the other
        # computes), so the coordinator may use every core of its host; expert workers compute at the same
        # time, so they split their host's cores among themselves.
        workers_per_node = Counter(nodes[b] for b in range(1, len(nodes)))
        ranks_per_node = Counter(nodes.values())
        rank_settings = RankSettings(
            model_dir=self.settings.model_dir, dtype=self.settings.dtype, device=self.settings.device.type,
            threads=self.options.threads_per_rank, backend="nccl" if self.settings.device.type == "cuda" else "gloo",
            collective_timeout_s=self.options.collective_timeout_s,
            compile_small_steps=self.settings.compile_small_steps,
        )
        shares_host = [ranks_per_node[nodes[b]] > 1 for b in range(len(nodes))]
        driver_node = ray.get_runtime_context().get_node_id()
        reserved = [self.options.reserved_cpus if nodes[b] == driver_node else 0 for b in range(len(nodes))]
        self.coordinator = self._actor(Coordinator, 0, max_concurrency=16, shares_host=shares_host[0]).remote(
            rank_settings, self.parallel, self.scheduler, 1, reserved[0]
        )
        self.workers = [
            self._actor(ExpertWorker, w + 1, max_concurrency=4, shares_host=shares_host[w + 1]).remote(
                w, self.placement.experts_of_worker(w), rank_settings, workers_per_node[nodes[w + 1]], reserved[w + 1]
            )
            for w in range(self.options.num_workers)
        ]

    def _actor(self, cls: type, bundle: int, *, max_concurrency: int, shares_host: bool):
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)
        env_vars = self.options.malloc.env_vars() if self.options.malloc else {}
        spin = self.options.shared_host_spin_count
        if spin is not None and shares_host:
            env_vars["GOMP_SPINCOUNT"] = str(spin)
        return ray.remote(cls).options(
            num_cpus=self.options.cpus_per_rank, num_gpus=self._bundle().get("GPU", 0), max_concurrency=max_concurrency,
            scheduling_strategy=strategy, max_restarts=0, runtime_env={"env_vars": env_vars} if env_vars else None,
        )

    def _load_all(self) -> None:
        names = ["coordinator"] + [f"expert worker {w}" for w in range(len(self.workers))]
        refs = [self.coordinator.load.remote()] + [w.load.remote() for w in self.workers]
        errors = []
        for name, ref in zip(names, refs, strict=True):
            try:
                ray.get(ref, timeout=self.options.start_timeout_s)
            except ray.exceptions.RayTaskError as exc:
                errors.append(str(exc.cause) if exc.cause else str(exc))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                errors.append(f"{name} did not start: {exc}")
        if errors:
            raise WorkerStartError("; ".join(errors))

    def _join_all(self) -> None:
        if self.parallel is not None:
            self.rendezvous = ray.get(self.coordinator.rendezvous_address.remote())
        kv_blocks = num_kv_blocks(self.settings, self.cfg)
        refs = [self.coordinator.start.remote(self.rendezvous, kv_blocks, self.settings.block_size)]
        if self.parallel is not None:
            refs += [
                w.join_group.remote(self.rendezvous, self.parallel)
                for w in self.workers
            ]
        try:
            ray.get(refs, timeout=self.options.start_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            raise WorkerStartError(str(exc.cause) if exc.cause else str(exc)) from exc
        self.worker_runs = [w.run.remote() for w in self.workers]

    def restart(self) -> None:
        """Replaces every actor and re-forms the process group, e.g. after a worker or a node was lost.
        Requests in flight on the old actors are lost (their callers see WorkerUnavailable)."""
        with self._lifecycle:
            log.warning("restarting the expert-parallel engine (restart %d)", self.restarts + 1)
            self.shutdown(graceful=False)
            self.start()
            self.restarts += 1

    def shutdown(self, timeout_s: float = 30.0, *, graceful: bool = True) -> None:
        """Stops the loop and the expert ranks, then removes every actor and the placement group.
        graceful=False skips the stop handshake (a peer is known to be dead) and kills at once."""
        if self.coordinator is not None and graceful:
            try:
                ray.get(self.coordinator.stop.remote(), timeout=timeout_s)
                ray.wait(self.worker_runs, num_returns=len(self.worker_runs), timeout=timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("clean stop failed (%s); killing the actors", exc)
        for actor in [self.coordinator, *self.workers]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        with self._lifecycle:
            subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.close()
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.coordinator, self.workers, self.worker_runs, self.pg = None, [], [], None

    def __enter__(self) -> RayExpertParallelEngine:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # requests ------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        _unwrap(self.submit_ref(request))

    def _live_coordinator(self):
        coordinator = self.coordinator
        if coordinator is None:
            raise WorkerUnavailable("the engine is (re)starting")
        return coordinator

    def submit_ref(self, request: GenerationRequest):
        return self._live_coordinator().submit.remote(request)

    def abort_ref(self, request_id: str):
        return self._live_coordinator().abort.remote(request_id)

    def abort(self, request_id: str) -> None:
        _unwrap(self.coordinator.abort.remote(request_id))

    def subscribe(self, timeout_s: float = 30.0) -> UpdateSubscription:
        """Opens the coordinator's update channel to this process (replacing any earlier one); raises
        WorkerUnavailable if it cannot."""
        coordinator = self._live_coordinator()
        subscription = UpdateSubscription(ray.util.get_node_ip_address())
        try:
            connected = coordinator.subscribe.remote(subscription.address)
            deadline = time.monotonic() + timeout_s
            while not subscription.connecting(0.05):  # the call fails first if the coordinator cannot connect
                if ray.wait([connected], timeout=0)[0]:
                    _unwrap(connected)
                    raise ChannelClosed("the coordinator returned without connecting")
                if time.monotonic() > deadline:
                    raise ChannelClosed(f"the coordinator did not connect within {timeout_s}s")
            subscription.accept(timeout_s)
            _unwrap(connected)
        except ChannelClosed as exc:
            subscription.close()
            raise WorkerUnavailable(f"the coordinator's update channel did not open: {exc}") from exc
        except BaseException:
            subscription.close()
            raise
        with self._lifecycle:
            previous, self._subscription = self._subscription, subscription
        if previous is not None:
            previous.close()
        return subscription

    def drain(self, timeout_s: float) -> list[SequenceUpdate]:
        return self.drain_with_stats(timeout_s)[0]

    def drain_with_stats(self, timeout_s: float) -> tuple[list[SequenceUpdate], StatsSnapshot | None]:
        """Every update the coordinator has sent, and its stats over them; waits up to timeout_s for the
        first. Subscribes on first use. One caller at a time. Raises WorkerUnavailable once the
        coordinator is gone (the next call subscribes to its replacement)."""
        subscription = self._subscription or self.subscribe()
        batches: list[UpdateBatch] = []
        try:
            ready = subscription.poll(timeout_s)
            while ready:
                batches.append(subscription.recv())
                ready = subscription.poll(0)
        except ChannelClosed as exc:
            with self._lifecycle:
                if self._subscription is subscription:
                    self._subscription = None
            subscription.close()
            raise WorkerUnavailable(f"the coordinator's update channel closed: {exc}") from exc
        updates = [u for b in batches for u in b.updates]
        return updates, merge_snapshots([b.stats for b in batches if b.stats is not None])

    def workers_up(self) -> list[bool]:
        """Per expert worker: still serving (its loop has not returned or died)."""
        if not self.worker_runs:
            return [False] * self.options.num_workers
        done, _ = ray.wait(self.worker_runs, num_returns=len(self.worker_runs), timeout=0)
        finished = {ref.hex() for ref in done}
        return [ref.hex() not in finished for ref in self.worker_runs]

    def healthy(self) -> bool:
        coordinator = self.coordinator
        if coordinator is None:
            return False
        try:
            failure = ray.get(coordinator.failure.remote(), timeout=5)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        return failure is None and all(self.workers_up())

    def generate(self, requests: list[GenerationRequest], timeout_s: float = 600.0) -> list[GenerationResult]:
        """Runs the requests together; raises WorkerUnavailable if a worker failure lost any of them."""
        results = {r.request_id: GenerationResult(r.request_id, r.prompt_token_ids) for r in requests}
        for request in requests:
            self.submit(request)
        deadline = time.monotonic() + timeout_s
        pending = set(results)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} requests unfinished after {timeout_s}s")
            for update in self.drain(1.0):
                result = results[update.request_id]
                result.token_ids.extend(update.token_ids)
                result.logprobs.extend(update.logprobs)
                if update.finish_reason:
                    result.finish_reason, result.error = update.finish_reason, update.error
                    pending.discard(update.request_id)
        failed = [r for r in results.values() if r.error]
        if failed:
            raise WorkerUnavailable(f"{len(failed)} of {len(results)} requests lost: {failed[0].error}")
        return [results[r.request_id] for r in requests]

    # introspection -------------------------------------------------------------------------------
    def inventories(self) -> dict[str, list[str]]:
        out = {"coordinator": ray.get(self.coordinator.inventory.remote())}
        for w, actor in enumerate(self.workers):
            out[f"worker {w}"] = ray.get(actor.inventory.remote())
        return out

    def pids(self) -> dict[str, int]:
        """Process id of the coordinator and of every expert worker (for memory and soak checks)."""
        out = {"coordinator": ray.get(self.coordinator.pid.remote())}
        for w, actor in enumerate(self.workers):
            out[f"worker {w}"] = ray.get(actor.pid.remote())
        return out

    def _ranks(self) -> dict[str, ray.actor.ActorHandle]:
        return {"coordinator": self.coordinator} | {f"worker {w}": a for w, a in enumerate(self.workers)}

    def torch_threads(self) -> dict[str, int]:
        """Torch intra-op threads of the coordinator and of every expert worker."""
        ranks = self._ranks()
        return dict(zip(ranks, ray.get([a.torch_threads.remote() for a in ranks.values()]), strict=True))

    def compiled_step_tokens(self) -> int:
        """The coordinator's largest compiled step in tokens (0: none; see EngineSettings.compile_small_steps)."""
        return ray.get(self.coordinator.compiled_step_tokens.remote())

    def worker_stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.workers])

    def rank_cpu_seconds(self) -> dict[str, float]:
        """Process CPU seconds so far of the coordinator and of every expert worker, each read in its process."""
        ranks = self._ranks()
        return dict(zip(ranks, ray.get([a.cpu_seconds.remote() for a in ranks.values()]), strict=True))


def _unwrap(ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise (exc.cause if exc.cause else exc) from None
    except ray.exceptions.RayActorError as exc:
        raise WorkerUnavailable(f"the coordinator is gone: {exc}") from exc
