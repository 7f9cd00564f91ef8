"""`mixserve.v1.MixServe` over grpc.aio: validate, submit, stream, and map typed errors to status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from cluster.errors import InvalidRequest, Overloaded, WorkerUnavailable
from cluster.gateway.access_log import log_request
from cluster.gateway.engine_client import EngineClient
from cluster.gateway.handlers import Undecodable
from cluster.gateway.metrics import GatewayMetrics
from cluster.gateway.text_stream import TextStream
from cluster.gateway.validation import RequestLimits, ValidatedRequest, validate_request
from cluster.requests import SequenceUpdate
from cluster.tokenizer import TextTokenizer
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from workers.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class RequestTrace:
    """Per-request timing and counts, recorded into metrics when the request ends."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    queue_seconds: float = 0.0
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def tokens_arrived(self, count: int, metrics: GatewayMetrics) -> None:
        """Tokens that arrive together share the gap since the previous arrival; those that come with the
        first token (a stream that fell behind) arrived with no gap."""
        if not count:
            return
        now = time.monotonic()
        gap = 0.0
        if self.first_token is None:
            self.first_token = now
            metrics.ttft.observe(now - self.arrival)
            count -= 1
        elif self.last_token is not None:
            gap = (now - self.last_token) / count
        for _ in range(count):
            metrics.itl.observe(gap)
        self.last_token = now

    def timings(self) -> pb.Timings:
        now = time.monotonic()
        ttft = (self.first_token - self.arrival) if self.first_token else 0.0
        return pb.Timings(queue_seconds=self.queue_seconds, time_to_first_token_seconds=ttft,
                          total_seconds=now - self.arrival)

    def usage(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=len(self.token_ids),
                        total_tokens=self.prompt_tokens + len(self.token_ids))


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


class MixServeServicer(pb_grpc.MixServeServicer):
    def __init__(self, *, client: EngineClient, cfg: ModelConfig, tokenizer: TextTokenizer | None,
                 limits: RequestLimits, model_info: pb.ModelInfo) -> None:
        self.client = client
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_info = model_info
        self.metrics = client.metrics

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await _reject_undecodable(request, context)
        return self.model_info

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        trace = RequestTrace()
        validated = await self._admit(request, context, trace)
        text, ids, logprobs, reason = [], [], [], ""
        async for chunk in self._run(validated, context, trace):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            reason = chunk.finish_reason or reason
        return pb.GenerateResponse(
            request_id=validated.request_id, text="".join(text), token_ids=ids,
            finish_reason=reason, usage=trace.usage(), logprobs=logprobs, timings=trace.timings(),
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        trace = RequestTrace()
        validated = await self._admit(request, context, trace)
        request_id = validated.request_id
        async for chunk in self._run(validated, context, trace):
            last = bool(chunk.finish_reason)
            yield pb.GenerateStreamResponse(
                request_id=request_id, text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs,
                finish_reason=chunk.finish_reason, usage=trace.usage() if last else None,
                timings=trace.timings() if last else None,
            )

    async def _run(
        self, validated: ValidatedRequest, context: grpc.aio.ServicerContext, trace: RequestTrace
    ) -> AsyncIterator[Chunk]:
        text = TextStream(self.tokenizer, list(validated.engine_request.prompt_token_ids), validated.stop)
        finished = engine_done = False
        code, reason = "CANCELLED", "abort"
        stream = None
        try:
            # a duplicate client id fails here and touches nobody else's stream; the engine sees a fresh id per
            # call, so a late abort of an earlier call can never hit a later call that reuses the client's id
            stream = self.client.open(validated.request_id, validated.engine_request.request_id)
            await self.client.send(stream, validated.engine_request)
            while not finished:
                update = _coalesce(await stream.updates.get(), stream.updates)
                if update.error:
                    code, reason, engine_done = "UNAVAILABLE", "error", True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"request lost: {update.error}")
                engine_done = update.finish_reason is not None
                chunk = self._chunk(update, validated, text, trace)
                finished = bool(chunk.finish_reason)
                if finished:
                    code, reason = "OK", chunk.finish_reason
                yield chunk
        except (Overloaded, WorkerUnavailable, InvalidRequest) as exc:
            code, reason, engine_done = _status(exc).name, "error", True
            await context.abort(_status(exc), str(exc))
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code = "DEADLINE_EXCEEDED"
            raise
        finally:
            if stream is not None and engine_done:
                self.client.release(stream)
            elif stream is not None:  # cancelled, deadline, or a stop string: free the engine's cache now
                await asyncio.shield(self.client.abort(stream))
            self._record_end(trace, reason, code, validated.request_id)

    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, trace: RequestTrace
    ) -> ValidatedRequest:
        if isinstance(request, Undecodable):
            self.metrics.count_request(finish_reason="error", code="INVALID_ARGUMENT")
        await _reject_undecodable(request, context)
        try:  # tokenizing a long prompt takes a while: keep it off the event loop that streams everyone's tokens
            validated = await asyncio.to_thread(validate_request, request, self.cfg, self.tokenizer, self.limits)
        except InvalidRequest as exc:
            self.metrics.count_request(finish_reason="error", code="INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.client.healthy:
            self.metrics.count_request(finish_reason="error", code="UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "an expert worker is down; retry later")
        trace.prompt_tokens = len(validated.engine_request.prompt_token_ids)
        return validated

    def _chunk(self, update, validated: ValidatedRequest, text: TextStream, trace: RequestTrace) -> Chunk:
        if update.queue_seconds is not None:
            trace.queue_seconds = update.queue_seconds
            self.metrics.queue.observe(update.queue_seconds)
        token_ids, delta, stopped = _push_until_stop(text, update.token_ids)
        trace.tokens_arrived(len(token_ids), self.metrics)
        trace.token_ids.extend(token_ids)
        logprobs = tuple(update.logprobs[: len(token_ids)]) if validated.want_logprobs else ()
        trace.logprobs.extend(logprobs)
        reason = update.finish_reason or ""
        if stopped:
            reason = "stop"
        if reason:
            delta += "" if stopped else text.finish()
        return Chunk(delta, token_ids, logprobs, reason)

    def _record_end(self, trace: RequestTrace, reason: str, code: str, request_id: str) -> None:
        self.metrics.observe_finished(finish_reason=reason, code=code, prompt_tokens=trace.prompt_tokens,
                                      completion_tokens=len(trace.token_ids))
        now = time.monotonic()
        if code == "OK":
            self.metrics.e2e.observe(now - trace.arrival)
        log_request(api="grpc", request_id=request_id, code=code, finish_reason=reason,
                    prompt_tokens=trace.prompt_tokens, completion_tokens=len(trace.token_ids),
                    ttft_s=None if trace.first_token is None else trace.first_token - trace.arrival,
                    total_s=now - trace.arrival)


def _coalesce(first: SequenceUpdate, queue: asyncio.Queue[SequenceUpdate]) -> SequenceUpdate:
    """`first` joined with every update already queued behind it: a stream that falls behind the engine
    sends one chunk for several steps instead of one per step."""
    parts = [first]
    while not queue.empty() and parts[-1].finish_reason is None:
        parts.append(queue.get_nowait())
    if len(parts) == 1:
        return first
    last = parts[-1]
    return SequenceUpdate(
        first.request_id, tuple(t for p in parts for t in p.token_ids), tuple(lp for p in parts for lp in p.logprobs),
        last.finish_reason, last.error, next((p.queue_seconds for p in parts if p.queue_seconds is not None), None),
    )


def _push_until_stop(text: TextStream, token_ids: tuple[int, ...]) -> tuple[tuple[int, ...], str, bool]:
    """Detokenizes the new tokens; a stop string ends them at the token that completed it.
    Returns (the tokens kept, the text delta, stopped)."""
    deltas = []
    for i, token_id in enumerate(token_ids):
        delta, stopped = text.push([token_id])
        deltas.append(delta)
        if stopped:
            return token_ids[: i + 1], "".join(deltas), True
    return token_ids, "".join(deltas), False


async def _reject_undecodable(request, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request: {request.size} bytes that are not a valid {request.message_type}")


def _status(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE
