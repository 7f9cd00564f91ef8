"""The engines a benchmark measures, each turning the workload's prompts into tokens: mixserve's in-process
`LLMEngine` (no Ray), the Ray expert-parallel engine with N expert workers (0: experts in the coordinator
actor), and transformers' `MixtralForCausalLM.generate` (batched, greedy, every sequence forced to exactly
`output_len` new tokens, left padding with an attention mask).

Each run is warmed up on the same prompts (a few tokens each) first. Ray wall time runs from the first
submit to the last token at the driver, so Ray calls are included; phases come from the engine's per-step
stats, and each expert worker reports its own dispatch / experts / combine seconds. transformers is
imported only when a baseline runs. Ray runs assume Ray is initialised by the caller.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
import torch
from tqdm import tqdm

from cluster.bench.machine import BENCH_PROCESS, add_into, delta, load_average
from cluster.bench.workload import (
    EngineSetup,
    Workload,
    engine_requests,
    engine_settings,
    load_transformers,
    scheduler_config,
)
from cluster.cpu_tuning import CpuPolicy
from cluster.engine import LLMEngine
from cluster.engine_factory import build_local_engine
from cluster.engine_stats import StatsSnapshot
from cluster.errors import WorkerUnavailable
from cluster.rank_introspection import rank_infos, worker_stats
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from workers.config import ModelConfig
from workers.runtime.timing import PHASES

OnTokens = Callable[[int], object]
HF_LABEL = "transformers (batched generate)"
IN_PROCESS_LABEL = "mixserve in-process (no Ray)"


def ray_label(workers: int, coordinators: int = 1) -> str:
    if workers == 0:
        return "mixserve Ray, 0 workers (experts in coordinator)"
    label = f"mixserve Ray, {workers} expert worker{'s' if workers > 1 else ''}"
    return label if coordinators == 1 else f"{label}, {coordinators} coordinators"


def cpu_seconds(engine: RayExpertParallelEngine | None = None) -> dict[str, float]:
    """Cumulative CPU seconds (user + system, every thread) by process: this one (in `bench serve` the gateway
    and the load generator, or the transformers baseline), then (given an engine) each rank's, read in its own
    process and named as the engine names it ("coordinator", "worker 0", ...). CPU seconds over wall seconds
    is how many cores a process kept busy; on a host of C cores, C minus the sum is what sat idle."""
    now = {BENCH_PROCESS: time.process_time()}
    if engine is None:
        return now
    return now | {name: info.cpu_seconds for name, info in rank_infos(engine).items()}


@contextmanager
def token_bar(total: int, desc: str, *, enabled: bool) -> Iterator[tqdm]:
    """A progress bar over generated tokens on stderr, or a no-op when progress is off."""
    with tqdm(total=total, desc=desc, unit="tok", disable=not enabled, leave=False, dynamic_ncols=True) as bar:
        yield bar


@dataclass(frozen=True)
class Steps:
    """Engine steps of one run: phase seconds of each, and whether it held prompt tokens (prefill)."""

    phases: tuple[dict[str, float], ...] = ()
    prefill: tuple[bool, ...] = ()

    @classmethod
    def of(cls, snapshot: StatsSnapshot) -> Steps:
        flags = tuple(t > s for s, t in zip(snapshot.batch_sizes, snapshot.batch_tokens, strict=True))
        return cls(snapshot.phase_seconds, flags)

    def __add__(self, other: Steps) -> Steps:
        return Steps(self.phases + other.phases, self.prefill + other.prefill)


@dataclass
class TimedRuns:
    """The timed runs of one engine (one per round): wall seconds, and phases / steps / expert workers' own
    phases / CPU seconds by process summed over the runs; the 1-minute load average is sampled around every run."""

    seconds: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    worker_phases: list[dict[str, float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # of the last run
    loads: list[float] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    prefill_seconds: float = 0.0  # steps holding prompt tokens (transformers: up to the first token)
    decode_seconds: float = 0.0  # one-token-per-sequence steps (transformers: after the first token)
    cpu: dict[str, float] = field(default_factory=dict)

    def sample_load(self) -> None:
        self.loads.append(load_average()[0])

    def add(self, seconds: float, steps: Steps, tokens: list[list[int]], cpu: dict[str, float]) -> None:
        self.sample_load()
        self.seconds.append(seconds)
        for step, prefill in zip(steps.phases, steps.prefill, strict=True):
            add_into(self.phases, step)
            if prefill:
                self.prefill_seconds += sum(step.values())
            else:
                self.decode_seconds += sum(step.values())
        self.steps += len(steps.phases)
        self.tokens = tokens
        add_into(self.cpu, cpu)

    def add_worker_phases(self, per_worker: list[dict[str, float]]) -> None:
        if not self.worker_phases:
            self.worker_phases = [{} for _ in per_worker]
        for total, run in zip(self.worker_phases, per_worker, strict=True):
            add_into(total, run)


def _local_generate(engine: LLMEngine, requests: list[GenerationRequest],
                    on_tokens: OnTokens) -> tuple[float, list[list[int]]]:
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    start = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    while engine.has_work():
        for update in engine.step():
            out[update.request_id].extend(update.token_ids)
            on_tokens(len(update.token_ids))
    return time.perf_counter() - start, [out[r.request_id] for r in requests]


def run_in_process(cfg: ModelConfig, setup: EngineSetup, workload: Workload, prompts: list[tuple[int, ...]],
                   timed: TimedRuns) -> None:
    """Builds the engine, warms it up, and adds one timed run of the workload to `timed`."""
    torch.set_num_threads(setup.threads_per_rank)
    engine = build_local_engine(engine_settings(cfg, setup, workload), scheduler_config(setup))

    def take_steps() -> Steps:
        return Steps.of(engine.stats.take(num_running=0, num_waiting=0, kv_cache_usage=0.0))

    _local_generate(engine, engine_requests(prompts, setup.warmup_tokens, "warmup"), lambda n: None)
    take_steps()
    requests = engine_requests(prompts, workload.output_len, f"run{len(timed.seconds)}")
    timed.sample_load()
    cpu_before = cpu_seconds()
    with token_bar(workload.output_tokens, IN_PROCESS_LABEL, enabled=setup.progress) as bar:
        seconds, tokens = _local_generate(engine, requests, bar.update)
    cpu = delta(cpu_before, cpu_seconds())
    timed.add(seconds, take_steps(), tokens, cpu)


def start_ray_engine(cfg: ModelConfig, setup: EngineSetup, workload: Workload, workers: int,
                     coordinators: int = 1, redundant_experts: int = 0) -> RayExpertParallelEngine:
    settings = engine_settings(cfg, setup, workload, workers)
    cpu = CpuPolicy(threads_per_rank=setup.threads_per_rank, reserved_cpus=setup.reserved_cpus)
    options = ClusterOptions(num_workers=workers, num_coordinators=coordinators, cpu=cpu,
                             redundant_experts=redundant_experts)
    engine = RayExpertParallelEngine(settings, options, scheduler_config(setup))
    engine.start()
    return engine


def _ray_generate(engine: RayExpertParallelEngine, requests: list[GenerationRequest], on_tokens: OnTokens,
                  timeout_s: float) -> tuple[float, Steps, list[list[int]]]:
    """Submits every request (spread over the coordinators in turn), drains until all finish; returns
    (seconds, the engine's steps (every coordinator's), tokens)."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    steps = Steps()
    start = time.perf_counter()
    ray.get([engine.submit_ref(r, i % engine.num_coordinators) for i, r in enumerate(requests)])
    pending = set(out)
    while pending:
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{len(pending)} requests unfinished after {timeout_s}s")
        updates, stats = engine.drain_all(1.0)
        for snapshot in stats:
            steps = steps + Steps.of(snapshot)
        for update in updates:
            if update.error:
                raise WorkerUnavailable(f"request {update.request_id} failed: {update.error}")
            out[update.request_id].extend(update.token_ids)
            on_tokens(len(update.token_ids))
            if update.finish_reason:
                pending.discard(update.request_id)
    return time.perf_counter() - start, steps, [out[r.request_id] for r in requests]


def worker_seconds(engine: RayExpertParallelEngine | None) -> list[dict[str, float]]:
    """Each expert worker's cumulative dispatch / experts / combine seconds ([] without workers)."""
    if engine is None or not engine.options.num_workers:
        return []
    return [dict(s["seconds"]) for s in worker_stats(engine)]


def worker_delta(before: list[dict[str, float]], after: list[dict[str, float]]) -> list[dict[str, float]]:
    return [delta(b, a) for b, a in zip(before, after, strict=True)]


def run_ray(cfg: ModelConfig, setup: EngineSetup, workload: Workload, prompts: list[tuple[int, ...]], workers: int,
            timed: TimedRuns, *, label: str | None = None, coordinators: int = 1) -> None:
    """Starts the engine, warms it up, adds one timed run of the workload to `timed`, and shuts it down."""
    engine = start_ray_engine(cfg, setup, workload, workers, coordinators)
    try:
        _ray_generate(engine, engine_requests(prompts, setup.warmup_tokens, "warmup"), lambda n: None,
                      setup.timeout_s)
        before = worker_seconds(engine)
        requests = engine_requests(prompts, workload.output_len, f"run{len(timed.seconds)}")
        timed.sample_load()
        cpu_before = cpu_seconds(engine)
        with token_bar(workload.output_tokens, label or ray_label(workers, coordinators),
                       enabled=setup.progress) as bar:
            seconds, steps, tokens = _ray_generate(engine, requests, bar.update, setup.timeout_s)
        timed.add(seconds, steps, tokens, delta(cpu_before, cpu_seconds(engine)))
        after = worker_seconds(engine)
    finally:
        engine.shutdown()
    timed.add_worker_phases(worker_delta(before, after))


@dataclass(frozen=True)
class BatchOutput:
    token_ids: list[list[int]]  # new tokens per sequence
    start: float  # perf_counter when generate was called
    end: float  # perf_counter when it returned
    step_times: tuple[float, ...]  # perf_counter after each generated position (all sequences at once)


def left_padded(prompts: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids_BL = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask_BL = torch.zeros((len(prompts), longest), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids_BL[row, longest - len(prompt):] = torch.tensor(prompt)
        mask_BL[row, longest - len(prompt):] = 1
    return ids_BL.to(device), mask_BL.to(device)


@torch.inference_mode()
def generate_batch(model, cfg: ModelConfig, prompts: list[tuple[int, ...]], output_len: int,
                   on_step: OnTokens | None = None) -> BatchOutput:
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        """Never stops; records when each position was generated."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            self.times.append(time.perf_counter())
            if on_step is not None:
                on_step(input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    pad = eos if eos is not None else 0
    ids_BL, mask_BL = left_padded(prompts, pad, model.device)
    gen_cfg = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=eos, use_cache=True)
    clock = StepClock()
    start = time.perf_counter()
    out_BT = model.generate(input_ids=ids_BL, attention_mask=mask_BL, generation_config=gen_cfg,
                            stopping_criteria=StoppingCriteriaList([clock]))
    new_BO = out_BT[:, ids_BL.shape[1]:].tolist()
    return BatchOutput(token_ids=new_BO, start=start, end=time.perf_counter(), step_times=tuple(clock.times))


def run_transformers(cfg: ModelConfig, setup: EngineSetup, workload: Workload, prompts: list[tuple[int, ...]],
                     timed: TimedRuns) -> None:
    """Loads the model, warms it up, and adds one timed generate over the whole workload (one batch) to `timed`."""
    torch.set_num_threads(setup.threads_per_rank)
    model = load_transformers(setup.model_dir, setup.dtype, setup.device)
    timed.notes = {"attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
                   "experts_implementation": str(getattr(model.config, "_experts_implementation", None)),
                   "batching": "one generate call per batch, left padding with attention mask"}
    generate_batch(model, cfg, prompts, setup.warmup_tokens)
    timed.sample_load()
    cpu_before = cpu_seconds()
    with token_bar(workload.output_tokens, "transformers generate", enabled=setup.progress) as bar:
        out = generate_batch(model, cfg, prompts, workload.output_len, bar.update)
    timed.add(out.end - out.start, Steps(), out.token_ids, delta(cpu_before, cpu_seconds()))
    timed.steps += len(out.step_times)
    timed.prefill_seconds += out.step_times[0] - out.start
    timed.decode_seconds += out.end - out.step_times[0]
    del model
    gc.collect()
