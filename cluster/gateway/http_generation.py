"""One HTTP request's run through the engine: submit, turn updates into text pieces, end (release or abort),
and record the metrics, as `MixServeServicer._run` does for gRPC but without a gRPC context.

It knows nothing about OpenAI's JSON or HTTP: `pieces()` yields text with its tokens and log probabilities,
typed errors (WorkerUnavailable) say what went wrong, and `close()`, always called once the response is over,
frees the engine's cache when the request did not finish there (a disconnect, a stop string, an error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster.errors import InvalidRequest, Overloaded, WorkerUnavailable
from cluster.gateway.access_log import log_request
from cluster.gateway.engine_client import EngineClient, RequestStream
from cluster.gateway.service import RequestTrace, _coalesce, _push_until_stop
from cluster.gateway.text_stream import TextStream
from cluster.gateway.validation import ValidatedRequest
from cluster.tokenizer import TextTokenizer

API = "http"  # the `api` label of mixserve_requests_total


@dataclass(frozen=True)
class Piece:
    text: str  # the text delta (stop strings excluded)
    tokens: tuple[str, ...]  # each new token as text (for log probabilities)
    logprobs: tuple[float, ...]  # of the new tokens, when asked for
    reason: str  # the engine's finish reason ("stop", "eos", "length"), "stop" for a stop string; "" until the end
    offset: int  # characters of the completion before this piece's text


class HttpGeneration:
    def __init__(self, client: EngineClient, tokenizer: TextTokenizer | None) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = client.metrics
        self.trace = RequestTrace()
        self.validated: ValidatedRequest | None = None
        self.stream: RequestStream | None = None
        self.engine_done = False
        self.code, self.reason = "CANCELLED", "abort"  # until the request ends otherwise
        self._chars = 0
        self._closed = False

    async def start(self, validated: ValidatedRequest) -> None:
        """Submits; raises the engine client's typed error (Overloaded, WorkerUnavailable) after recording it."""
        self.validated = validated
        self.trace.prompt_tokens = len(validated.engine_request.prompt_token_ids)
        try:
            self.stream = self.client.open(validated.request_id, validated.engine_request.request_id)
            await self.client.send(self.stream, validated.engine_request)
        except (InvalidRequest, Overloaded, WorkerUnavailable) as exc:
            self.code = ("INVALID_ARGUMENT" if isinstance(exc, InvalidRequest)
                         else "RESOURCE_EXHAUSTED" if isinstance(exc, Overloaded) else "UNAVAILABLE")
            self.reason, self.engine_done = "error", True
            await self.close()
            raise

    async def pieces(self) -> AsyncIterator[Piece]:
        assert self.stream is not None and self.validated is not None, "start() first"
        request = self.validated.engine_request
        text = TextStream(self.tokenizer, list(request.prompt_token_ids), self.validated.stop)
        while True:
            update = _coalesce(await self.stream.updates.get(), self.stream.updates)
            if update.error:
                self.code, self.reason, self.engine_done = "UNAVAILABLE", "error", True
                raise WorkerUnavailable(update.error)
            self.engine_done = update.finish_reason is not None
            piece = self._piece(update, text)
            if piece.reason:
                self.code, self.reason = "OK", piece.reason
            yield piece
            if piece.reason:
                return

    def _piece(self, update, text: TextStream) -> Piece:
        if update.queue_seconds is not None:
            self.trace.queue_seconds = update.queue_seconds
            self.metrics.queue.observe(update.queue_seconds)
        token_ids, delta, stopped = _push_until_stop(text, update.token_ids)
        self.trace.tokens_arrived(len(token_ids), self.metrics)
        self.trace.token_ids.extend(token_ids)
        want_logprobs = self.validated.want_logprobs
        logprobs = tuple(update.logprobs[: len(token_ids)]) if want_logprobs else ()
        reason = "stop" if stopped else (update.finish_reason or "")
        if reason and not stopped:
            delta += text.finish()
        tokens = tuple(self._token_text(t) for t in token_ids) if want_logprobs else ()
        offset, self._chars = self._chars, self._chars + len(delta)
        return Piece(delta, tokens, logprobs, reason, offset)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    async def close(self) -> None:
        """Ends the request once: releases it (the engine finished it) or aborts it there; records metrics."""
        if self._closed:
            return
        self._closed = True
        self.metrics.observe_finished(finish_reason=self.reason, code=self.code, prompt_tokens=self.trace.prompt_tokens,
                                      completion_tokens=len(self.trace.token_ids), api=API)
        if self.code == "OK":
            self.metrics.e2e.observe(time.monotonic() - self.trace.arrival)
        log_request(api=API, request_id=self.validated.request_id if self.validated else "-", code=self.code,
                    finish_reason=self.reason, prompt_tokens=self.trace.prompt_tokens,
                    completion_tokens=len(self.trace.token_ids),
                    ttft_s=None if self.trace.first_token is None else self.trace.first_token - self.trace.arrival,
                    total_s=time.monotonic() - self.trace.arrival)
        if self.stream is not None and self.engine_done:
            self.client.release(self.stream)
        elif self.stream is not None:  # a disconnect or a stop string: free the engine's cache now
            await asyncio.shield(self.client.abort(self.stream))  # runs to the end even if we are cancelled
