"""Process-level settings resolved once at the entry point: model path, device, dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "mixserve-tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


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
    kv_cache_bytes: int = 256 * 2**20
    block_size: int = 16
    num_workers: int = 0
    # torch.compile the layers of small steps (decode) where every expert is in-process: see
    # workers.model.fused_decode. Costs a compile at start (tens of seconds on a CPU).
    compile_small_steps: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
