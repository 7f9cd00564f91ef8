"""One admitted request's run through the engine, for either API: submit it through the `EngineClient`, read
its stream's updates (coalesced when the stream falls behind), detokenize and cut at stop strings, end it
(release it, or abort it in the engine), and record its metrics and access-log line.

It knows nothing about gRPC, HTTP or OpenAI's JSON. Each API validates its own request into a
`ValidatedRequest`, then `start()`s a run, turns `pieces()` into its responses and the typed errors
(InvalidRequest, Overloaded, WorkerUnavailable; `RequestLost` once the engine has taken the request) into its
own statuses, and always `close()`s the run once its response is over: that frees the engine's cache when the
request did not finish there (a cancel, a disconnect, a deadline, a stop string, an error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster.errors import InvalidRequest, Overloaded, WorkerUnavailable
from cluster.gateway.access_log import log_request
from cluster.gateway.engine_client import EngineClient, RequestStream
from cluster.gateway.metrics import GatewayMetrics
from cluster.gateway.text_stream import TextStream
from cluster.gateway.validation import ValidatedRequest
from cluster.requests import SequenceUpdate
from cluster.tokenizer import TextTokenizer

SUBMIT_ERRORS = (InvalidRequest, Overloaded, WorkerUnavailable)  # what `start()` raises


class RequestLost(WorkerUnavailable):
    """The engine reported an error for a request it had taken (past the replay timeout)."""


@dataclass
class RequestTrace:
    """Per-request timing and counts, recorded into metrics when the request ends."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    queue_seconds: float = 0.0
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)

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

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(frozen=True)
class Piece:
    text: str  # the text delta (stop strings excluded)
    token_ids: tuple[int, ...]  # the new tokens (up to the one that completed a stop string)
    logprobs: tuple[float, ...]  # of the new tokens, when asked for
    reason: str  # the engine's finish reason ("stop", "eos", "length"), "stop" for a stop string; "" until the end
    offset: int  # characters of the completion before this piece's text


class GenerationRun:
    """Create it when the request arrives (its trace starts the request's clock); `api` labels its metrics and
    access-log line ("grpc" or "http")."""

    def __init__(self, client: EngineClient, tokenizer: TextTokenizer | None, *, api: str) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.api = api
        self.metrics = client.metrics
        self.trace = RequestTrace()
        self.validated: ValidatedRequest | None = None
        self.stream: RequestStream | None = None
        self.engine_done = False
        self.code, self.reason = "CANCELLED", "abort"  # until the request ends otherwise
        self._chars = 0
        self._closed = False

    async def start(self, validated: ValidatedRequest) -> None:
        """Submits; raises the engine client's typed error (one of SUBMIT_ERRORS) after recording it."""
        self.validated = validated
        self.trace.prompt_tokens = len(validated.engine_request.prompt_token_ids)
        try:
            # a duplicate client id fails here and touches nobody else's stream; the engine sees a fresh id per
            # call, so a late abort of an earlier call can never hit a later call that reuses the client's id
            self.stream = self.client.open(validated.request_id, validated.engine_request.request_id)
            await self.client.send(self.stream, validated.engine_request)
        except SUBMIT_ERRORS as exc:
            self.code = ("INVALID_ARGUMENT" if isinstance(exc, InvalidRequest)
                         else "RESOURCE_EXHAUSTED" if isinstance(exc, Overloaded) else "UNAVAILABLE")
            self.reason, self.engine_done = "error", True
            await self.close()
            raise

    async def pieces(self) -> AsyncIterator[Piece]:
        """The request's output until its finish reason (the last piece has one); raises RequestLost."""
        assert self.stream is not None and self.validated is not None, "start() first"
        text = TextStream(self.tokenizer, list(self.validated.engine_request.prompt_token_ids), self.validated.stop)
        while True:
            update = _coalesce(await self.stream.updates.get(), self.stream.updates)
            if update.error:
                self.code, self.reason, self.engine_done = "UNAVAILABLE", "error", True
                raise RequestLost(update.error)
            self.engine_done = update.finish_reason is not None
            piece = self._piece(update, text)
            if piece.reason:
                self.code, self.reason = "OK", piece.reason
            yield piece
            if piece.reason:
                return

    def deadline_exceeded(self) -> None:
        """The client's deadline passed (the API saw its call cancelled for it): counted as DEADLINE_EXCEEDED."""
        self.code = "DEADLINE_EXCEEDED"

    async def close(self) -> None:
        """Ends the request once: records metrics and the access log; releases the request (the engine finished
        it) or aborts it there."""
        if self._closed:
            return
        self._closed = True
        trace, now = self.trace, time.monotonic()
        self.metrics.observe_finished(finish_reason=self.reason, code=self.code, prompt_tokens=trace.prompt_tokens,
                                      completion_tokens=len(trace.token_ids), api=self.api)
        if self.code == "OK":
            self.metrics.e2e.observe(now - trace.arrival)
        log_request(api=self.api, request_id=self.validated.request_id if self.validated else "-", code=self.code,
                    finish_reason=self.reason, prompt_tokens=trace.prompt_tokens,
                    completion_tokens=len(trace.token_ids), ttft_s=trace.ttft_s, total_s=now - trace.arrival)
        if self.stream is not None and self.engine_done:
            self.client.release(self.stream)
        elif self.stream is not None:  # cancelled, a deadline, a disconnect or a stop string: free the cache now
            await asyncio.shield(self.client.abort(self.stream))  # runs to the end even if we are cancelled

    def _piece(self, update: SequenceUpdate, text: TextStream) -> Piece:
        if update.queue_seconds is not None:
            self.trace.queue_seconds = update.queue_seconds
            self.metrics.queue.observe(update.queue_seconds)
        token_ids, delta, stopped = _push_until_stop(text, update.token_ids)
        self.trace.tokens_arrived(len(token_ids), self.metrics)
        self.trace.token_ids.extend(token_ids)
        logprobs = tuple(update.logprobs[: len(token_ids)]) if self.validated.want_logprobs else ()
        reason = "stop" if stopped else (update.finish_reason or "")
        if reason and not stopped:
            delta += text.finish()
        offset, self._chars = self._chars, self._chars + len(delta)
        return Piece(delta, token_ids, logprobs, reason, offset)


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
