"""Frozen configuration for the model and its parallel layout.

`ModelConfig` is read from a Hugging Face Mixtral `config.json`; every field is checked on
construction and a bad or missing one raises `ValueError` naming it. This module knows nothing
about processes or devices beyond plain values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
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

    def params_per_token_by_part(self) -> dict[str, int]:
        """Weights one token's forward pass multiplies by, by part: in each layer its attention projections,
        the router and its top-k experts; once, the lm_head (for a sampled position)."""
        d, heads, kv_heads = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        return {
            "attention_projections": d * (heads + 2 * kv_heads) * self.head_dim + heads * self.head_dim * d,
            "router": d * self.num_local_experts,
            "experts_top_k": self.num_experts_per_tok * 3 * d * self.intermediate_size,
            "lm_head": self.vocab_size * d,
        }

    @property
    def active_params_per_token(self) -> int:
        """Weights one sampled token's forward pass multiplies by: every layer's parts and the lm_head."""
        parts = self.params_per_token_by_part()
        lm_head = parts.pop("lm_head")
        return self.num_hidden_layers * sum(parts.values()) + lm_head

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
    """Where each expert lives: ranks 0..num_coordinators-1 are attention ranks (coordinators), expert workers
    are the ranks after them.

    `worker_of_expert[e]` is the worker index (0-based) holding expert e's first copy, the same for every
    layer; `redundant_copies` are its other copies (replicas), as (expert, worker) pairs: expert e's copies, in
    replica order, are `workers_of_expert[e]` = (worker_of_expert[e], then the workers of its pairs in order).
    A worker holds at most one copy of an expert; its local experts are the experts it holds, sorted by global
    id, and a copy's local index is its expert's position among them. The one placement record: the Ray layer
    reads which checkpoint tensors each worker opens from it, the attention rank where each row goes.
    """

    worker_of_expert: tuple[int, ...]
    # copies beyond each expert's first, (expert, worker) in replica order (`contiguous(redundant_experts=R)`)
    redundant_copies: tuple[tuple[int, int], ...] = ()
    collective_timeout_s: float = 20.0
    # A step's rows go out in one collective with their counts (workers.comm.single_source) while the padding
    # it sends, workers x T*K rows, stays within this many bytes (one worker: always, it pads nothing); 0: never.
    # Only the attention rank reads it: the step header carries its decision to the expert ranks.
    single_collective_max_bytes: int = 1 << 20
    # attention ranks sending to the same workers in the same collectives (docs/SCALING.md, "Several
    # coordinators"); with more than one, every step exchanges split sizes first
    num_coordinators: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_coordinators, int) or self.num_coordinators < 1:
            raise ConfigError(f"num_coordinators must be an int >= 1, got {self.num_coordinators!r}")
        if not isinstance(self.worker_of_expert, tuple):
            raise ConfigError(f"worker_of_expert must be a tuple, got {type(self.worker_of_expert).__name__}")
        if not self.worker_of_expert:
            raise ConfigError("worker_of_expert is empty: there must be at least one expert")
        for expert, worker in enumerate(self.worker_of_expert):
            if not _is_index(worker):
                raise ConfigError(
                    f"worker_of_expert: expert {expert} is assigned to worker {worker!r}, not a worker index >= 0"
                )
        self._check_redundant_copies()
        held = {w for workers in self.workers_of_expert for w in workers}
        idle = sorted(set(range(self.num_workers)) - held)
        if idle:
            raise ConfigError(
                f"worker_of_expert: workers {idle} of 0..{self.num_workers - 1} hold no experts: "
                "every worker must hold at least one"
            )
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"collective_timeout_s must be positive, got {self.collective_timeout_s}")
        if self.single_collective_max_bytes < 0:
            raise ConfigError(f"single_collective_max_bytes must be >= 0, got {self.single_collective_max_bytes}")

    def _check_redundant_copies(self) -> None:
        if not isinstance(self.redundant_copies, tuple):
            raise ConfigError(f"redundant_copies must be a tuple, got {type(self.redundant_copies).__name__}")
        held = set(enumerate(self.worker_of_expert))
        for copy in self.redundant_copies:
            if not (isinstance(copy, tuple) and len(copy) == 2 and all(map(_is_index, copy))):
                raise ConfigError(f"redundant_copies: {copy!r} is not an (expert, worker) pair of indices >= 0")
            expert, worker = copy
            if expert >= self.num_experts:
                raise ConfigError(f"redundant_copies: expert {expert} is outside [0, {self.num_experts})")
            if copy in held:
                raise ConfigError(
                    f"redundant_copies: worker {worker} would hold expert {expert} twice (a worker holds at most "
                    "one copy of an expert)"
                )
            held.add(copy)

    @classmethod
    def contiguous(
        cls, *, num_experts: int, num_workers: int, redundant_experts: int = 0, **options: Any
    ) -> ParallelConfig:
        """Contiguous, as-even-as-possible blocks of physical copies: 8 experts on 3 workers -> [0,1,2],
        [3,4,5], [6,7]. With redundant_experts R the copies are experts 0..E-1, then R more: experts 0, 1, ...
        again, round after round (R = E: every expert twice), so 8 experts + 2 on 4 workers -> [0,1,2], [3,4,5],
        [6,7], [0,1]. A block never holds an expert twice (copies of one expert are E apart, blocks at most E
        long). options: the other fields (collective_timeout_s, single_collective_max_bytes, ...)."""
        _positive("num_experts", num_experts)
        _positive("num_workers", num_workers)
        if not isinstance(redundant_experts, int) or isinstance(redundant_experts, bool) or redundant_experts < 0:
            raise ConfigError(f"redundant_experts must be an integer >= 0, got {redundant_experts!r}")
        physical = num_experts + redundant_experts
        if num_workers > physical:
            extra = f" + redundant_experts ({redundant_experts})" if redundant_experts else ""
            raise ConfigError(
                f"num_workers ({num_workers}) exceeds num_experts ({num_experts}){extra}: every worker must hold "
                "at least one expert (redundant experts add copies)"
            )
        if redundant_experts > num_experts * (num_workers - 1):
            raise ConfigError(
                f"redundant_experts ({redundant_experts}) exceeds {num_experts * (num_workers - 1)}: a worker holds "
                f"at most one copy of an expert, so {num_workers} workers hold at most {num_workers} copies of each "
                f"of the {num_experts} experts"
            )
        base, extra = divmod(physical, num_workers)
        boundary = extra * (base + 1)  # the first `extra` workers hold base + 1 copies, the rest base
        worker_of_copy = [
            p // (base + 1) if p < boundary else extra + (p - boundary) // base for p in range(physical)
        ]
        return cls(
            worker_of_expert=tuple(worker_of_copy[:num_experts]),
            redundant_copies=tuple((p % num_experts, worker_of_copy[p]) for p in range(num_experts, physical)),
            **options,
        )

    @property
    def num_experts(self) -> int:
        return len(self.worker_of_expert)

    @property
    def num_workers(self) -> int:
        return max((*self.worker_of_expert, *(w for _, w in self.redundant_copies))) + 1

    @property
    def world_size(self) -> int:
        return self.num_coordinators + self.num_workers

    @property
    def worker_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_coordinators, self.world_size))

    @property
    def workers_of_expert(self) -> tuple[tuple[int, ...], ...]:
        """[E][copies]: the worker of each copy of each expert, in replica order (the first: worker_of_expert)."""
        workers: list[list[int]] = [[w] for w in self.worker_of_expert]
        for expert, worker in self.redundant_copies:
            workers[expert].append(worker)
        return tuple(map(tuple, workers))

    @property
    def copies_of_expert(self) -> tuple[int, ...]:
        return tuple(map(len, self.workers_of_expert))

    @property
    def replicated(self) -> bool:
        """Whether any expert has more than one copy (the dispatcher then splits its rows)."""
        return bool(self.redundant_copies)

    def experts_of_worker(self, worker: int) -> tuple[int, ...]:
        """Sorted global expert ids held by `worker` (its local experts, in local index order)."""
        if not 0 <= worker < self.num_workers:
            raise ConfigError(f"worker {worker} is out of range [0, {self.num_workers})")
        return tuple(e for e, workers in enumerate(self.workers_of_expert) if worker in workers)

    @property
    def replica_ranks(self) -> tuple[tuple[int, ...], ...]:
        """[E][copies]: the rank of each copy of each expert."""
        return tuple(tuple(w + self.num_coordinators for w in ws) for ws in self.workers_of_expert)

    @property
    def replica_local_indices(self) -> tuple[tuple[int, ...], ...]:
        """[E][copies]: each copy's local index on its worker (its expert's position among the worker's)."""
        local = {w: {e: i for i, e in enumerate(self.experts_of_worker(w))} for w in range(self.num_workers)}
        return tuple(tuple(local[w][e] for w in ws) for e, ws in enumerate(self.workers_of_expert))

    @property
    def rank_of_expert(self) -> tuple[int, ...]:
        """The rank of each expert's first copy."""
        return tuple(ranks[0] for ranks in self.replica_ranks)

    @property
    def local_index_of_expert(self) -> tuple[int, ...]:
        """The local index of each expert's first copy."""
        return tuple(indices[0] for indices in self.replica_local_indices)

    def covered_by(self, workers: Iterable[int]) -> bool:
        """Whether `workers` together hold at least one copy of every expert."""
        kept = set(workers)
        return all(kept.intersection(ws) for ws in self.workers_of_expert)

    def on_workers(self, workers: Sequence[int]) -> ParallelConfig:
        """The copies that `workers` hold, on a group of just them: worker workers[i] becomes worker i, each
        expert's first copy is its first copy left in replica order. A failover onto surviving copies uses it:
        the survivors keep exactly the experts they hold. Raises ConfigError naming the experts left with no copy."""
        index = {w: i for i, w in enumerate(workers)}
        if len(index) != len(workers) or not all(0 <= w < self.num_workers for w in index):
            raise ConfigError(f"workers {list(workers)} are not distinct workers of 0..{self.num_workers - 1}")
        kept = [[index[w] for w in ws if w in index] for ws in self.workers_of_expert]
        lost = [e for e, ws in enumerate(kept) if not ws]
        if lost:
            raise ConfigError(f"experts {lost} have no copy on workers {list(workers)}")
        return replace(self, worker_of_expert=tuple(ws[0] for ws in kept),
                       redundant_copies=tuple((e, w) for e, ws in enumerate(kept) for w in ws[1:]))

    @property
    def max_local_experts(self) -> int:
        """e_max: the largest number of experts any worker holds."""
        held = [0] * self.num_workers
        for workers in self.workers_of_expert:
            for worker in workers:
                held[worker] += 1
        return max(held)


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
