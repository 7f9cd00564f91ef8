"""`mixserve.v1.MixServe` over grpc.aio: validate, run (generation_run.py), stream, and map typed errors to
status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from cluster.errors import InvalidRequest, Overloaded
from cluster.gateway.engine_client import EngineClient
from cluster.gateway.generation_run import SUBMIT_ERRORS, GenerationRun, Piece, RequestLost, RequestTrace
from cluster.gateway.handlers import Undecodable
from cluster.gateway.validation import RequestLimits, ValidatedRequest, validate_request
from cluster.tokenizer import TextTokenizer
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from workers.config import ModelConfig

log = logging.getLogger(__name__)
API = "grpc"  # the `api` label of mixserve_requests_total


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
        run = GenerationRun(self.client, self.tokenizer, api=API)  # its trace starts the request's clock
        validated = await self._admit(request, context)
        text, ids, logprobs, reason = [], [], [], ""
        async for piece in self._run(run, validated, context):
            text.append(piece.text)
            ids.extend(piece.token_ids)
            logprobs.extend(piece.logprobs)
            reason = piece.reason or reason
        return pb.GenerateResponse(
            request_id=validated.request_id, text="".join(text), token_ids=ids,
            finish_reason=reason, usage=_usage(run.trace), logprobs=logprobs, timings=_timings(run.trace),
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        run = GenerationRun(self.client, self.tokenizer, api=API)
        validated = await self._admit(request, context)
        request_id = validated.request_id
        async for piece in self._run(run, validated, context):
            last = bool(piece.reason)
            yield pb.GenerateStreamResponse(
                request_id=request_id, text=piece.text, token_ids=piece.token_ids, logprobs=piece.logprobs,
                finish_reason=piece.reason, usage=_usage(run.trace) if last else None,
                timings=_timings(run.trace) if last else None,
            )

    async def _run(
        self, run: GenerationRun, validated: ValidatedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Piece]:
        """The run's pieces; its errors become statuses, and it ends (release or abort, metrics) either way."""
        try:
            await run.start(validated)
            async for piece in run.pieces():
                yield piece
        except RequestLost as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"request lost: {exc}")
        except SUBMIT_ERRORS as exc:
            await context.abort(_status(exc), str(exc))
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                run.deadline_exceeded()
            raise
        finally:
            await run.close()

    async def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> ValidatedRequest:
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
        return validated


def _timings(trace: RequestTrace) -> pb.Timings:
    return pb.Timings(queue_seconds=trace.queue_seconds, time_to_first_token_seconds=trace.ttft_s or 0.0,
                      total_seconds=time.monotonic() - trace.arrival)


def _usage(trace: RequestTrace) -> pb.Usage:
    completion = len(trace.token_ids)
    return pb.Usage(prompt_tokens=trace.prompt_tokens, completion_tokens=completion,
                    total_tokens=trace.prompt_tokens + completion)


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
