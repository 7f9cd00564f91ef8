"""OpenAI request bodies → `mixserve.v1.GenerateRequest`, and results → OpenAI response objects.

This module knows nothing about HTTP, the engine or validation limits: it checks the JSON *types* and the
OpenAI-only options (n, echo, penalties, ...) and builds the same protobuf request the gRPC API receives, so
both APIs share `validation.validate_request` (ranges, limits, tokenization, the chat template). A validation
error names the gRPC field; `openai_param` translates it to the OpenAI parameter.

Decisions: one choice per request (`n` > 1 is rejected); log probabilities are those of the sampled tokens
(completions `logprobs: 0`, chat `logprobs: true` with `top_logprobs: 0`), alternatives are not computed;
vLLM's extensions `top_k`, `ignore_eos`, `stop_token_ids` and `add_generation_prompt` are accepted; unknown
fields are ignored, as vLLM does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from protos import mixserve_pb2 as pb

MAX_SEED = 2**64 - 1
FINISH_REASONS = {"length": "length"}  # everything else ("stop", "eos", a stop string) is "stop"
_PARAMS = {  # gRPC field → OpenAI parameter
    "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
    "sampling.stop": "stop", "sampling.stop_token_ids": "stop_token_ids", "sampling.seed": "seed",
    "prompt_token_ids": "prompt", "request_id": None,
}


class OpenAIError(Exception):
    """An error the client sees as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_param(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class ParsedRequest:
    """What an OpenAI body asks for: the gRPC request plus the options only the HTTP layer uses."""

    kind: str  # "completion" | "chat"
    model: str
    request: pb.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    max_tokens_param: str | None = None  # the parameter that set max_tokens; None: the API's default applies
    param_names: dict[str, str | None] = field(default_factory=dict)

    def openai_param(self, grpc_field: str) -> str | None:
        """The OpenAI parameter behind a validation error's field ("sampling.top_p" → "top_p")."""
        if grpc_field in self.param_names:
            return self.param_names[grpc_field]
        return _PARAMS.get(grpc_field, grpc_field)


# parsing ---------------------------------------------------------------------------------------------
def parse_completion(body: object) -> ParsedRequest:
    body = _object(body)
    prompt = _single_prompt(body.get("prompt"))
    request = pb.GenerateRequest()
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    _reject_unsupported(body, echo=False, suffix=None, best_of=1)
    logprobs = _typed(body, "logprobs", int, None)
    if logprobs is not None and logprobs != 0:
        raise bad_param("logprobs", f"only 0 is supported (the sampled tokens' log probabilities), got {logprobs}")
    request.sampling.logprobs = logprobs is not None
    return _finish(body, "completion", request, max_tokens_param="max_tokens")


def parse_chat(body: object) -> ParsedRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "must be a non-empty array of {role, content} objects")
    request = pb.GenerateRequest()
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_param(f"messages[{i}]", "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_param(f"messages[{i}].role", "must be a string")
        request.messages.append(pb.ChatMessage(role=role, content=_content(message.get("content"), i)))
    add_generation_prompt = _typed(body, "add_generation_prompt", bool, None)
    if add_generation_prompt is not None:
        request.add_generation_prompt = add_generation_prompt
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_param(name, "tool calling is not supported")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_param("response_format", "only {\"type\": \"text\"} is supported")
    _reject_unsupported(body)
    top_logprobs = _typed(body, "top_logprobs", int, 0)
    if top_logprobs:
        raise bad_param("top_logprobs", f"only 0 is supported (alternatives are not computed), got {top_logprobs}")
    request.sampling.logprobs = bool(_typed(body, "logprobs", bool, False))
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _finish(body, "chat", request, max_tokens_param=max_param, prompt_param="messages")


def _finish(body: dict, kind: str, request: pb.GenerateRequest, *, max_tokens_param: str,
            prompt_param: str = "prompt") -> ParsedRequest:
    """The options completions and chat share."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "is required: one of the ids GET /v1/models lists")
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise bad_param("n", f"only 1 choice per request is supported, got {n}")
    s = request.sampling
    max_tokens = _typed(body, max_tokens_param, int, None)
    if max_tokens is not None:
        s.max_new_tokens = max_tokens
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise bad_param("temperature", f"must be in [0, 2], got {temperature}")
    s.temperature = temperature
    s.top_p = _number(body, "top_p", 1.0)
    s.top_k = _typed(body, "top_k", int, 0)
    seed = _typed(body, "seed", int, None)
    if seed is not None:
        if not 0 <= seed <= MAX_SEED:
            raise bad_param("seed", f"must be in [0, 2**64), got {seed}")
        s.seed = seed
    s.stop.extend(_stop(body.get("stop")))
    s.ignore_eos = bool(_typed(body, "ignore_eos", bool, False))
    stop_ids = _typed(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise bad_param("stop_token_ids", "must be an array of integers")
    s.stop_token_ids.extend(stop_ids)
    stream = bool(_typed(body, "stream", bool, False))
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise bad_param("stream_options", "is only allowed when stream is true")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_param("stream_options.include_usage", "must be a boolean")
    return ParsedRequest(kind, model, request, stream, include_usage,
                         max_tokens_param if max_tokens is not None else None,
                         {"sampling.max_new_tokens": max_tokens_param, "prompt": prompt_param,
                          "prompt_token_ids": prompt_param})


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return body


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_param(name, f"must be {_KIND_NAMES[kind]}, got {type(value).__name__}")
    return value


_KIND_NAMES = {int: "an integer", bool: "a boolean", list: "an array", dict: "an object", str: "a string"}


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_param(name, f"must be a finite number, got {value!r}")
    return float(value)


def _single_prompt(prompt: object) -> str | list[int]:
    """A string or a token id array; a batch (an array of those) only with one element."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad_param("prompt", f"batches of {len(prompt)} prompts are not supported; send one per request")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise bad_param("prompt", "must be a string or an array of token ids")


def _content(content: object, i: int) -> str:
    """A message's text: a string, null, or an array of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_param(f"messages[{i}].content[{j}]", "only {\"type\": \"text\", \"text\": ...} parts "
                                                               "are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_param(f"messages[{i}].content", "must be a string or an array of text parts")


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise bad_param("stop", "must be a string or an array of strings")


def _reject_unsupported(body: dict, **allowed: Any) -> None:
    """OpenAI options mixserve does not implement, accepted only at their neutral values."""
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, **allowed}
    for name, value in neutral.items():
        given = body.get(name)
        if given is not None and given != value:
            raise bad_param(name, f"is not supported (only {value!r}), got {given!r}")


# responses -------------------------------------------------------------------------------------------
def finish_reason(reason: str) -> str | None:
    return FINISH_REASONS.get(reason, "stop") if reason else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": list(tokens), "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs, strict=True)]}


def completion_object(*, request_id: str, model: str, created: int, text: str, reason: str | None,
                      logprobs: dict | None, chunk: bool, usage_: dict | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
    out = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model,
           "choices": [choice]}
    if not chunk or usage_ is not None:
        out["usage"] = usage_
    return out


def chat_object(*, request_id: str, model: str, created: int, text: str | None, reason: str | None,
                logprobs: dict | None, chunk: bool, first: bool = False, usage_: dict | None = None) -> dict[str, Any]:
    if chunk:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": reason}
    out = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk" if chunk else "chat.completion",
           "created": created, "model": model, "choices": [choice]}
    if not chunk or usage_ is not None:
        out["usage"] = usage_
    return out


def usage_chunk(kind: str, *, request_id: str, model: str, created: int, usage_: dict) -> dict[str, Any]:
    """The last event of a stream with stream_options.include_usage: no choices, only the usage."""
    prefix, obj = ("chatcmpl", "chat.completion.chunk") if kind == "chat" else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{request_id}", "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_}


def models_list(model_id: str, *, created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(model_id, created=created, max_model_len=max_model_len)]}


def model_object(model_id: str, *, created: int, max_model_len: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mixserve",
            "max_model_len": max_model_len}


def now() -> int:
    return int(time.time())
