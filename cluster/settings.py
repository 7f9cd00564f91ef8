"""Process-level settings resolved once at the entry point: model path, device, dtype."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.config import ModelConfig
from workers.runtime.attention_rank import MicroBatching

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "mixserve-tiny"
DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None, *, ranks_run_here: bool) -> torch.device:
    """The ranks' device. ranks_run_here: the ranks run in this process (offline generation with in-process
    experts), so CUDA must be here; otherwise they are Ray actors that check their own node, and a gateway
    without a GPU may start CUDA ranks on GPU nodes (the default then is this machine's)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if ranks_run_here and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


# Below this many active parameters per token a token costs the ranks little next to what the gateway spends
# streaming it, so the ranks on the gateway's host leave it a core. Measured on 2 cores, --concurrency 32
# (docs/PERFORMANCE.md, 2026-12-04): the shipped 1.7M-parameter model streams 9-17% more tokens/s with the core
# reserved (5-10% with 1 expert worker); W2 (230M) streams 38% fewer (42 against 68 tok/s) with it reserved,
# its gateway using 2% of a core.
GATEWAY_CORE_BELOW_PARAMS = 50_000_000


def gateway_reserved_cpus(active_params_per_token: int) -> int:
    """`mixserve serve`'s default --reserved-cpus for a model (see GATEWAY_CORE_BELOW_PARAMS)."""
    return 1 if active_params_per_token < GATEWAY_CORE_BELOW_PARAMS else 0


def resolve_reserved_cpus(requested: int | None, model_dir: Path) -> int:
    """The CPUs the ranks on a gateway's host leave to it: `requested`, or the model's default
    (cluster.cpu_tuning.gateway_reserved_cpus)."""
    if requested is not None:
        return requested
    return gateway_reserved_cpus(ModelConfig.from_model_dir(model_dir).active_params_per_token)


def resolve_micro_batches(requested: int | None, device: torch.device) -> int:
    """Ping-pong micro-batches per step: `requested`, else 2 on CUDA and 1 (off) on CPU. Measured on the 2-core
    CPU (W2, 1 expert worker, docs/PERFORMANCE.md "Ping-pong"): the ranks already take turns on both cores, so
    an overlapped rank only competes for them (17.36 s against 17.17 s); on GPUs every rank has its own device,
    which is where the overlap pays (projected in docs/SCALING.md; not yet measured on a GPU)."""
    if requested is not None:
        return requested
    return 2 if device.type == "cuda" else 1


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    kv_cache_bytes: int | None = None  # None: DEFAULT_CPU_KV_CACHE_BYTES on CPU, from free memory on CUDA
    gpu_memory_utilization: float = 0.9  # CUDA, kv_cache_bytes None: the share of device memory mixserve may hold
    block_size: int = 16
    num_workers: int = 0
    # torch.compile the layers of small steps (decode) where every expert is in-process: see
    # workers.model.fused_decode. Costs a compile at start (tens of seconds on a CPU).
    compile_small_steps: bool = False
    # ping-pong with expert workers: steps of enough tokens split into micro-batches whose attention overlaps
    # the other micro-batch's experts (workers.runtime.attention_rank); micro_batches=1 turns it off
    micro_batching: MicroBatching = field(default_factory=MicroBatching)

    def __post_init__(self) -> None:
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
