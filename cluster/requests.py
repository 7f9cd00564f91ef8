"""What the engine is asked to do and what it answers; plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.model.sampler import SamplingParams


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class SequenceUpdate:
    """New tokens of one request from one engine step; finish_reason is set on its last update."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None = None  # "stop" | "length" | "eos" | "abort" | "error"
    error: str | None = None  # set with finish_reason "error": the request was lost to a worker failure
    queue_seconds: float | None = None  # on a request's first token: time from arrival to first scheduling


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
