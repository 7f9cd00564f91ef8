"""Turns a `mixserve.v1.GenerateRequest` into an engine request, or raises InvalidRequest naming the field."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from cluster.errors import InvalidRequest
from cluster.requests import GenerationRequest
from cluster.tokenizer import TextTokenizer, require_tokenizer
from protos import mixserve_pb2 as pb
from workers.config import ModelConfig
from workers.model.sampler import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 16


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    max_new_tokens: int = 4096
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_prompt_chars: int = 200_000
    max_request_id_chars: int = 256

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_stop_strings", "max_stop_chars", "max_prompt_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str  # the client's id (or one made up for it), echoed in responses
    engine_request: GenerationRequest  # carries a fresh id of its own, unique per call
    stop: tuple[str, ...]
    want_logprobs: bool


def validate_request(
    request: pb.GenerateRequest, cfg: ModelConfig, tokenizer: TextTokenizer | None, limits: RequestLimits
) -> ValidatedRequest:
    request_id = request.request_id or uuid.uuid4().hex
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequest("request_id", f"is longer than {limits.max_request_id_chars} characters")
    prompt_ids = _prompt_ids(request, cfg, tokenizer, limits)
    s = request.sampling
    context = cfg.max_position_embeddings
    if s.HasField("max_new_tokens"):
        max_new = s.max_new_tokens
        if not 1 <= max_new <= limits.max_new_tokens:
            raise InvalidRequest("sampling.max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {max_new}")
        if len(prompt_ids) + max_new > context:  # as vLLM does: never a silently shorter answer
            raise InvalidRequest("sampling.max_new_tokens", f"the prompt's {len(prompt_ids)} tokens plus {max_new} new "
                                 f"tokens exceed the model's context of {context} tokens")
    else:  # the default shrinks to what the context has room for
        max_new = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens, context - len(prompt_ids))
    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest("sampling.temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if s.top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0 (0 disables it), got {s.top_k}")
    stop = _stop_strings(s, tokenizer, limits)
    stop_ids = tuple(s.stop_token_ids)
    bad = next((t for t in stop_ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise InvalidRequest("sampling.stop_token_ids", f"token id {bad} is outside [0, {cfg.vocab_size})")
    if len(stop_ids) > limits.max_stop_strings:
        raise InvalidRequest("sampling.stop_token_ids", f"has more than {limits.max_stop_strings} ids")
    sampling = SamplingParams(
        temperature=temperature, top_k=s.top_k, top_p=top_p, seed=s.seed if s.HasField("seed") else None
    )
    engine_request = GenerationRequest(
        request_id=uuid.uuid4().hex, prompt_token_ids=prompt_ids, sampling=sampling, max_new_tokens=max_new,
        stop_token_ids=stop_ids, ignore_eos=s.ignore_eos,
    )
    return ValidatedRequest(request_id, engine_request, stop, s.logprobs)


def _prompt_ids(
    request: pb.GenerateRequest, cfg: ModelConfig, tokenizer: TextTokenizer | None, limits: RequestLimits
) -> tuple[int, ...]:
    if request.HasField("prompt") and not (request.prompt or request.prompt_token_ids or request.messages):
        raise InvalidRequest("prompt", "is empty")
    given = [name for name, present in (("prompt", bool(request.prompt)),
                                        ("prompt_token_ids", bool(request.prompt_token_ids)),
                                        ("messages", bool(request.messages))) if present]
    if len(given) != 1:
        raise InvalidRequest("prompt", "set exactly one of prompt, prompt_token_ids and messages")
    if request.messages:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        add_generation_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        ids, field = chat_prompt_ids(messages, add_generation_prompt, tokenizer, limits), "messages"
    elif request.prompt:
        if len(request.prompt) > limits.max_prompt_chars:
            raise InvalidRequest("prompt", f"is longer than {limits.max_prompt_chars} characters")
        ids = tuple(require_tokenizer(tokenizer, "prompt").encode(request.prompt))
        field = "prompt"
    else:
        ids = tuple(request.prompt_token_ids)
        field = "prompt_token_ids"
        bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(field, f"token id {bad} is outside [0, {cfg.vocab_size})")
    if len(ids) >= cfg.max_position_embeddings:
        raise InvalidRequest(field, f"has {len(ids)} tokens; the context holds {cfg.max_position_embeddings}")
    return ids


def chat_prompt_ids(
    messages: object, add_generation_prompt: bool, tokenizer: TextTokenizer | None, limits: RequestLimits
) -> tuple[int, ...]:
    """A conversation rendered by the model's chat template; raises InvalidRequest naming the field."""
    prompt = require_tokenizer(tokenizer, "messages").encode_chat(messages, add_generation_prompt=add_generation_prompt)
    if len(prompt.text) > limits.max_prompt_chars:
        raise InvalidRequest("messages", f"render to {len(prompt.text)} characters; at most {limits.max_prompt_chars}")
    return tuple(prompt.token_ids)


def _stop_strings(s: pb.SamplingParams, tokenizer: TextTokenizer | None, limits: RequestLimits) -> tuple[str, ...]:
    stop = tuple(s.stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest("sampling.stop", f"has {len(stop)} strings; at most {limits.max_stop_strings}")
    for text in stop:
        if not text:
            raise InvalidRequest("sampling.stop", "stop strings must not be empty")
        if len(text) > limits.max_stop_chars:
            raise InvalidRequest("sampling.stop", f"a stop string is longer than {limits.max_stop_chars} characters")
    if stop:
        require_tokenizer(tokenizer, "sampling.stop")
    return stop
