"""Frozen configuration for the model and its parallel layout.

`ModelConfig` is read from a Hugging Face Mixtral `config.json`; every field is checked on
construction and a bad or missing one raises `ValueError` naming it. This module knows nothing
about processes or devices beyond plain values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent with another."""


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
            "max_position_embeddings",
        ):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window)
        for name, token_id in [("bos_token_id", self.bos_token_id)] + [
            ("eos_token_id", t) for t in self.eos_token_ids
        ]:
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"{name} ({token_id}) is outside the vocabulary [0, {self.vocab_size})")

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face Mixtral `config.json` (transformers 4.x or 5.x)."""
        def need(name: str) -> Any:
            if name not in raw or raw[name] is None:
                raise ConfigError(f"config.json is missing the required field {name!r}")
            return raw[name]

        model_type = raw.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"model_type must be 'mixtral', got {model_type!r}")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = raw.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else 0)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            num_local_experts=need("num_local_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(_rope_theta(raw)),
            sliding_window=raw.get("sliding_window"),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"no config.json in model directory {model_dir}") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_hf_dict(raw)


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
    if raw.get("rope_scaling"):
        raise ConfigError("rope_scaling is not supported")
    return params.get("rope_theta", raw.get("rope_theta", 1e6))


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Where each expert lives: rank 0 is the attention rank, expert workers are ranks 1..num_workers.

    `worker_of_expert[e]` is the worker index (0-based) holding expert e, the same for every layer;
    `local_index_of_expert[e]` is its position among that worker's experts.
    """

    worker_of_expert: tuple[int, ...]
    collective_timeout_s: float = 20.0
    # A step's rows go out in one collective with their counts (workers.comm.single_source) while the padding
    # it sends, workers x T*K rows, stays within this many bytes (one worker: always, it pads nothing); 0: never.
    single_collective_max_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.worker_of_expert:
            raise ConfigError("worker_of_expert is empty")
        workers = set(self.worker_of_expert)
        if workers != set(range(len(workers))):
            raise ConfigError(f"worker_of_expert must use workers 0..N-1 each at least once, got {sorted(workers)}")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"collective_timeout_s must be positive, got {self.collective_timeout_s}")
        if self.single_collective_max_bytes < 0:
            raise ConfigError(f"single_collective_max_bytes must be >= 0, got {self.single_collective_max_bytes}")

    @property
    def num_workers(self) -> int:
        return max(self.worker_of_expert) + 1

    @property
    def world_size(self) -> int:
        return self.num_workers + 1

    def experts_of_worker(self, worker: int) -> tuple[int, ...]:
        return tuple(e for e, w in enumerate(self.worker_of_expert) if w == worker)

    @property
    def rank_of_expert(self) -> tuple[int, ...]:
        return tuple(w + 1 for w in self.worker_of_expert)

    @property
    def local_index_of_expert(self) -> tuple[int, ...]:
        seen: dict[int, int] = {}
        out = []
        for w in self.worker_of_expert:
            out.append(seen.get(w, 0))
            seen[w] = out[-1] + 1
        return tuple(out)

    @property
    def max_local_experts(self) -> int:
        return max(len(self.experts_of_worker(w)) for w in range(self.num_workers))
