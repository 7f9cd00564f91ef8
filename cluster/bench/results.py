"""Result records (frozen dataclasses) and the ratios between them; JSON out.

Ratios are computed only from numbers measured in the same run: output tok/s against the transformers
baseline, wall time against the reference mixserve engine ("EP overhead"), and the compute floor over
the wall time (the fraction of the machine's matmul rate the engine reached).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from workers.config import ModelConfig

TRANSFORMERS = "transformers"
IN_PROCESS = "in-process"
RAY = "ray"


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    path: str
    layers: int
    hidden_size: int
    intermediate_size: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    vocab_size: int
    sliding_window: int | None

    @classmethod
    def of(cls, path: Path, cfg: ModelConfig) -> ModelSummary:
        return cls(path=str(path), layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, experts=cfg.num_local_experts,
                   top_k=cfg.num_experts_per_tok, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                   vocab_size=cfg.vocab_size, sliding_window=cfg.sliding_window)


@dataclass(frozen=True, kw_only=True)
class EngineRun:
    """One engine over the whole offline workload; times and phases are per timed run."""

    label: str
    engine: str  # transformers | in-process | ray
    workers: int | None  # Ray expert workers (0: experts in the coordinator actor)
    seconds: float  # median over the timed runs (one per round)
    run_seconds: tuple[float, ...]
    best_seconds: float  # the fastest run: least disturbed by other processes
    requests: int
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    steps: int  # engine steps (transformers: generated positions)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # engine StepTimings, summed over steps
    prefill_seconds: float | None = None  # steps holding prompt tokens (transformers: start → first token)
    decode_seconds: float | None = None  # one-token steps (transformers: first token → end)
    unaccounted_seconds: float | None = None  # mean wall time − phases: scheduling, Ray calls, Python
    worker_phase_seconds: tuple[dict[str, float], ...] = ()  # each expert worker's own timings
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per run, by process (cluster.bench.cpu_time)
    exact_output_len: bool = True  # every request produced exactly output_len tokens
    agreement_with_transformers: float | None = None  # fraction of requests with the same tokens
    load_1m: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after: other processes distort times
    notes: dict[str, str] = field(default_factory=dict)


class Measured(Protocol):
    label: str
    engine: str
    seconds: float
    output_tokens_per_s: float


@dataclass(frozen=True, kw_only=True)
class Ratios:
    label: str
    tok_s_vs_transformers: float | None  # output tok/s ÷ the transformers baseline's
    time_vs_reference: float | None  # wall time ÷ the reference mixserve engine's (EP overhead)
    floor_fraction: float | None  # compute-floor seconds ÷ wall time
    roofline_fraction: float | None = None  # roofline-floor seconds ÷ wall time


def run_stats(label: str, engine: str, workers: int | None, run_seconds: list[float], requests: int,
              output_tokens: int) -> dict[str, Any]:
    """The common timing fields of a result: median seconds and the rates from it."""
    seconds = statistics.median(run_seconds)
    return dict(label=label, engine=engine, workers=workers, seconds=seconds, run_seconds=tuple(run_seconds),
                best_seconds=min(run_seconds),
                requests=requests, output_tokens=output_tokens, output_tokens_per_s=output_tokens / seconds,
                requests_per_s=requests / seconds)


def compute_ratios(items: list[Measured], *, reference_label: str | None,
                   floor_seconds: float | None = None, roofline_seconds: float | None = None) -> list[Ratios]:
    baseline = next((m for m in items if m.engine == TRANSFORMERS), None)
    reference = next((m for m in items if m.label == reference_label), None)
    return [
        Ratios(
            label=m.label,
            tok_s_vs_transformers=m.output_tokens_per_s / baseline.output_tokens_per_s if baseline else None,
            time_vs_reference=m.seconds / reference.seconds if reference else None,
            floor_fraction=floor_seconds / m.seconds if floor_seconds else None,
            roofline_fraction=roofline_seconds / m.seconds if roofline_seconds else None,
        )
        for m in items
    ]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in ("per_forwarded_token", "best", "output_tokens", "forwarded_tokens"):
            attr = getattr(type(value), name, None)
            if isinstance(attr, property):
                out[name] = getattr(value, name)
        return out
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(report: Any) -> str:
    return json.dumps(_jsonable(report), indent=2, ensure_ascii=False)


def write_json(report: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(report) + "\n")
