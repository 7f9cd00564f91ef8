"""The machine a benchmark ran on: what it is (RunMeta), how loaded it was, its measured matmul rate and
copy bandwidth; and the floors those rates set for the workload.

Compute floor: the workload's matmul FLOPs over the measured matmul rate. It counts the weights each token
multiplies (attention projections, router, its top-k experts) and the lm_head on sampled positions only;
attention scores (QKᵀ, PV), norms, RoPE and softmax are left out.

Roofline floor: per step of an ideal engine, the larger of the step's matmul time at the measured matmul
rate and its memory time at the measured copy bandwidth (bytes read plus written per second, as
`scripts/gpu_check.sh` divides by), summed over the workload's steps. A decode step multiplies few rows by
every expert's weights, so where memory is slow next to the matmul units (a 2-core VM: ~25 GB/s against
~340 GFLOP/s) reading the weights, not multiplying them, bounds the step. The ideal engine runs the N
prompts in batches of B = min(N, max_num_seqs): one prefill step of B·P tokens, then O−1 decode steps of B
tokens. A step reads each weight it uses once: attention projections, router, lm_head, and the experts
its B·K picks hit (expected under uniform routing, E·(1−(1−K/E)^B); an estimate, not a bound), plus the
K/V of its keys (sliding window applied). The prefill step's activations are not counted; its FLOPs dominate.

Needs neither Ray nor gRPC (the GPU check uses the byte counts and the bandwidth).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from cluster.bench.workload import Workload
from workers.config import ModelConfig

COMPUTE_FORMULA = (
    "FLOPs = 2 × (T_fwd × L × (D·(H+2·Hkv)·Dh + H·Dh·D + D·E + K·3·D·F) + T_sampled × V·D), "
    "T_fwd = N·(P+O−1) tokens through the layers, T_sampled = N·O lm_head rows; "
    "attention scores (QKᵀ, PV), norms, RoPE and softmax excluded"
)
ROOFLINE_FORMULA = (
    "floor = Σ_steps max(FLOPs_step / matmul rate, bytes_step / copy bandwidth); per batch of B = min(N, max_num_seqs) "
    "prompts: 1 prefill step (B·P tokens) + O−1 decode steps (B tokens); bytes_step = s × (L × (D·(H+2·Hkv)·Dh + "
    "H·Dh·D + D·E + E_hit·3·D·F) + V·D + B × keys × L × 2·Hkv·Dh), E_hit = E·(1−(1−K/E)^tokens), "
    "keys = min(context, sliding window), s = bytes per element"
)
BENCH_PROCESS = "bench process"  # cluster.bench.runners.cpu_seconds names this process so, and the ranks
COORDINATOR = "coordinator"  # as the engine names them: "coordinator", "worker 0", ...
MATMUL_SIZE = 2048
# Copied per bandwidth measurement: with its destination, 1 GiB moved, above any last-level cache we have met
COPY_BYTES = 512 << 20


@dataclass(frozen=True, kw_only=True)
class RunMeta:
    date_utc: str
    cpu: str
    logical_cpus: int
    memory_gib: float
    gpu: str | None
    platform: str
    python: str
    versions: dict[str, str]
    git_commit: str | None  # when the run started (Ray actors import the code from disk when they start)
    git_commit_end: str | None  # differs when the code changed during the run
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def _versions() -> dict[str, str]:
    out = {}
    for name in ("mixserve", "torch", "transformers", "ray", "grpcio"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class RunStart:
    load_average: tuple[float, float, float]
    git_commit: str | None


def run_start() -> RunStart:
    return RunStart(load_average(), git_commit())


def run_meta(start: RunStart) -> RunMeta:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return RunMeta(
        date_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), cpu=_cpu_model(),
        logical_cpus=os.cpu_count() or 1, memory_gib=_memory_gib(), gpu=gpu, platform=platform.platform(),
        python=platform.python_version(), versions=_versions(), git_commit=start.git_commit,
        git_commit_end=git_commit(), load_average_start=start.load_average, load_average_end=load_average(),
    )


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after − before, key by key (a key missing before counts from 0)."""
    return {key: after[key] - before.get(key, 0.0) for key in after}


def add_into(total: dict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(run: Callable[[], object], device: torch.device, reps: int) -> float:
    """The fastest of `reps` timed calls of `run` after two warm-ups, each synchronised on the device."""
    best = math.inf
    for i in range(reps + 2):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, *, size: int = MATMUL_SIZE, reps: int = 5) -> float:
    """The best rate of `reps` [size, size] @ [size, size] products, in FLOP/s."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    return 2.0 * size**3 / best_seconds(lambda: torch.matmul(a, b), device, reps)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes read plus written per second by the best of `reps` device-to-device copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_seconds(lambda: dst.copy_(src), device, reps)


@dataclass(frozen=True, kw_only=True)
class ParamsPerToken:
    attention_projections: int  # per layer
    router: int  # per layer
    experts_top_k: int  # per layer
    layers: int
    lm_head: int  # per sampled position

    @property
    def per_forwarded_token(self) -> int:
        return self.layers * (self.attention_projections + self.router + self.experts_top_k)


@dataclass(frozen=True, kw_only=True)
class MatmulRate:
    size: int
    dtype: str
    device: str
    threads: int
    flops_per_s: tuple[float, ...]  # one per measurement (start and end of the run)

    @property
    def best(self) -> float:
        return max(self.flops_per_s)


@dataclass(frozen=True, kw_only=True)
class MemoryBandwidth:
    copy_bytes: int
    device: str
    threads: int
    bytes_per_s: tuple[float, ...]  # bytes read plus written per second by a copy; at the start and end of the run

    @property
    def best(self) -> float:
        return max(self.bytes_per_s)


@dataclass(frozen=True, kw_only=True)
class ComputeFloor:
    formula: str
    params: ParamsPerToken
    forwarded_tokens: int
    sampled_positions: int
    flops: float
    matmul: MatmulRate
    floor_seconds: float  # flops / the best measured matmul rate


@dataclass(frozen=True, kw_only=True)
class RooflineFloor:
    formula: str
    batch_sizes: tuple[int, ...]  # sequences per batch of the ideal schedule
    decode_steps: int  # over all batches
    prefill_seconds: float  # the prefill steps' share of the floor
    decode_seconds: float  # the decode steps' share
    decode_memory_bound_steps: int  # decode steps whose bytes, not FLOPs, set their time
    decode_bytes_per_step: float  # mean
    bandwidth: MemoryBandwidth
    floor_seconds: float


def params_per_token(cfg: ModelConfig) -> ParamsPerToken:
    return ParamsPerToken(**cfg.params_per_token_by_part(), layers=cfg.num_hidden_layers)


def compute_floor(cfg: ModelConfig, workload: Workload, rate: MatmulRate) -> ComputeFloor:
    params = params_per_token(cfg)
    flops = 2.0 * (workload.forwarded_tokens * params.per_forwarded_token + workload.output_tokens * params.lm_head)
    return ComputeFloor(
        formula=COMPUTE_FORMULA, params=params, forwarded_tokens=workload.forwarded_tokens,
        sampled_positions=workload.output_tokens, flops=flops, matmul=rate, floor_seconds=flops / rate.best,
    )


def experts_hit(cfg: ModelConfig, tokens: int) -> float:
    """Expected distinct experts of one layer that `tokens` tokens' top-K picks hit, under uniform routing."""
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** tokens)


def layer_elements(cfg: ModelConfig, *, experts_per_layer: float, keys_read: int) -> dict[str, float]:
    """Elements a step reads in its layers, by part: every layer's attention projections and router, the
    weights of `experts_per_layer` experts and `keys_read` K/V rows in each layer (the lm_head excluded)."""
    params = params_per_token(cfg)
    layers = params.layers
    return {
        "attention": layers * params.attention_projections,
        "router": layers * params.router,
        "experts": layers * experts_per_layer * 3 * cfg.hidden_size * cfg.intermediate_size,
        "kv_cache": layers * keys_read * 2 * cfg.num_key_value_heads * cfg.head_dim,
    }


def step_bytes(cfg: ModelConfig, *, tokens: int, keys_read: int, element_size: int) -> float:
    """Bytes a step of `tokens` tokens reads: its weights once (lm_head included), plus `keys_read` K/V rows per
    layer."""
    parts = layer_elements(cfg, experts_per_layer=experts_hit(cfg, tokens), keys_read=keys_read)
    return element_size * (sum(parts.values()) + cfg.vocab_size * cfg.hidden_size)


def roofline_floor(cfg: ModelConfig, workload: Workload, *, max_num_seqs: int, matmul_flops_per_s: float,
                   bandwidth: MemoryBandwidth, element_size: int) -> RooflineFloor:
    params = params_per_token(cfg)
    n, p, o = workload.num_prompts, workload.prompt_len, workload.output_len
    full = min(n, max_num_seqs)
    batches = (full,) * (n // full) + ((n % full,) if n % full else ())
    window = cfg.sliding_window or math.inf
    prefill = decode = 0.0
    memory_bound, decode_bytes = 0, 0.0
    for b in batches:
        prefill_flops = 2.0 * (b * p * params.per_forwarded_token + b * params.lm_head)
        prefill_bytes = step_bytes(cfg, tokens=b * p, keys_read=0, element_size=element_size)
        prefill += max(prefill_flops / matmul_flops_per_s, prefill_bytes / bandwidth.best)
        for j in range(1, o):  # input: output token j at position p + j - 1, attending to p + j keys
            nbytes = step_bytes(cfg, tokens=b, keys_read=b * min(p + j, window), element_size=element_size)
            compute_s = 2.0 * b * (params.per_forwarded_token + params.lm_head) / matmul_flops_per_s
            memory_s = nbytes / bandwidth.best
            decode += max(compute_s, memory_s)
            memory_bound += memory_s > compute_s
            decode_bytes += nbytes
    steps = len(batches) * (o - 1)
    return RooflineFloor(
        formula=ROOFLINE_FORMULA, batch_sizes=batches, decode_steps=steps, prefill_seconds=prefill,
        decode_seconds=decode, decode_memory_bound_steps=memory_bound,
        decode_bytes_per_step=decode_bytes / steps if steps else 0.0, bandwidth=bandwidth,
        floor_seconds=prefill + decode,
    )
