"""The OpenAI-compatible HTTP API of the gateway: Starlette routes served by uvicorn in the gateway's own loop.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true`: server-sent events
ending in `data: [DONE]`) and an open `GET /health`. Requests go through what gRPC requests go through: the
same validation (`validate_request`, after `openai_schema` turned the body into a `GenerateRequest`), the same
run through the engine (`generation_run.GenerationRun`: submit, detokenize, end, metrics with `api="http"`, the
access log) and API keys (`Authorization: Bearer`, compared as security.py does).
Errors are OpenAI error objects: 400 naming the parameter, 401, 404 (an unknown model), 413, 429, 503.
A client that disconnects aborts its request in the engine, as a cancelled gRPC call does.

This module knows nothing about sockets, TLS or shutdown: `http_server.HttpServer` runs the app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cluster.errors import InvalidRequest, Overloaded
from cluster.gateway import openai_schema as oa
from cluster.gateway.engine_client import EngineClient
from cluster.gateway.generation_run import SUBMIT_ERRORS, GenerationRun, Piece, RequestLost
from cluster.gateway.openai_schema import OpenAIError
from cluster.gateway.security import INVALID_KEY, bearer_token, matches_any
from cluster.gateway.validation import RequestLimits, ValidatedRequest, validate_request
from cluster.tokenizer import TextTokenizer
from workers.config import ModelConfig

log = logging.getLogger(__name__)
API = "http"  # the `api` label of mixserve_requests_total
MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED",
          503: "UNAVAILABLE"}  # HTTP status → the gRPC status name counted in mixserve_requests_total


class OpenAIApp:
    """Holds what the routes need; `app` is the ASGI application."""

    def __init__(self, *, client: EngineClient, cfg: ModelConfig, tokenizer: TextTokenizer | None,
                 limits: RequestLimits, model_id: str, key_digests: tuple[bytes, ...], max_body_bytes: int) -> None:
        self.client, self.cfg, self.tokenizer, self.limits = client, cfg, tokenizer, limits
        self.metrics = client.metrics
        self.model_id = model_id
        self.key_digests = key_digests
        self.max_body_bytes = max_body_bytes
        self.created = oa.now()
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={OpenAIError: _error_response, HTTPException: _http_error_response})

    # routes --------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Open like grpc.health.v1: 200 while the engine serves, else 503."""
        healthy = self.client.healthy
        return JSONResponse({"status": "SERVING" if healthy else "NOT_SERVING"}, status_code=200 if healthy else 503)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(oa.models_list(self.model_id, created=self.created,
                                           max_model_len=self.cfg.max_position_embeddings))

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(oa.model_object(self.model_id, created=self.created,
                                            max_model_len=self.cfg.max_position_embeddings))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, oa.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, oa.parse_chat)

    # the generation path -------------------------------------------------------------------------------
    async def _generate(self, request: Request, parse: Callable[[object], oa.ParsedRequest]) -> Response:
        self._authorize(request)
        generation = GenerationRun(self.client, self.tokenizer, api=API)  # its trace starts the request's clock
        try:
            parsed = parse(await self._json(request))
            self._check_model(parsed.model)
            validated = await self._validate(parsed)
            if not self.client.healthy:
                raise OpenAIError(503, "an expert worker is down; retry later", type_="service_unavailable")
        except OpenAIError as exc:
            if exc.status in _CODES:
                self.metrics.count_request(finish_reason="error", code=_CODES[exc.status], api=API)
            raise
        try:
            await generation.start(validated)
        except SUBMIT_ERRORS as exc:
            raise _typed_error(exc, parsed) from None
        return EngineResponse(generation, parsed, self.model_id, validated.request_id)

    async def _validate(self, parsed: oa.ParsedRequest) -> ValidatedRequest:
        try:  # tokenizing a long prompt takes a while: keep it off the loop that streams everyone's tokens
            validated = await asyncio.to_thread(validate_request, parsed.request, self.cfg, self.tokenizer,
                                                self.limits)
        except InvalidRequest as exc:
            raise _typed_error(exc, parsed) from None
        if parsed.kind == "chat" and parsed.max_tokens_param is None:  # OpenAI: up to the context's end
            room = self.cfg.max_position_embeddings - len(validated.engine_request.prompt_token_ids)
            max_new = max(1, min(self.limits.max_new_tokens, room))
            validated = dataclasses.replace(
                validated, engine_request=dataclasses.replace(validated.engine_request, max_new_tokens=max_new))
        return validated

    def _authorize(self, request: Request) -> None:
        if not self.key_digests:
            return
        token = bearer_token([("authorization", v) for v in request.headers.getlist("authorization")])
        if token is None or not matches_any(token, self.key_digests):
            raise OpenAIError(401, MISSING_KEY if token is None else INVALID_KEY, code="invalid_api_key")

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise OpenAIError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}'",
                              param="model", code="model_not_found")

    async def _json(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None


class EngineResponse(Response):
    """Streams (or collects) a started generation and always ends it: on a disconnect, an error or the end,
    `generation.close()` frees the engine's cache and records the metrics."""

    def __init__(self, generation: GenerationRun, parsed: oa.ParsedRequest, model: str, request_id: str) -> None:
        self.generation, self.parsed = generation, parsed
        self.ids = {"request_id": request_id, "model": model, "created": oa.now()}
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            work = self._stream(send) if self.parsed.stream else self._unary(send)
            await _unless_disconnected(receive, work)
        finally:
            await self.generation.close()

    async def _unary(self, send: Send) -> None:
        pieces = []
        try:
            async for piece in self.generation.pieces():
                pieces.append(piece)
        except RequestLost as exc:
            await _send_json(send, 503, _unavailable(exc).body())
            return
        await _send_json(send, 200, self._render(_join(pieces), chunk=False))

    async def _stream(self, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first = True
        try:
            async for piece in self.generation.pieces():
                if piece.text or piece.reason or piece.logprobs or first:
                    await _send_event(send, self._render(piece, chunk=True, first=first))
                    first = False
        except RequestLost as exc:
            await _send_event(send, _unavailable(exc).body())
        else:
            if self.parsed.include_usage:
                await _send_event(send, oa.usage_chunk(self.parsed.kind, usage_=self._usage(), **self.ids))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _render(self, piece: Piece, *, chunk: bool, first: bool = False) -> dict[str, Any]:
        reason = oa.finish_reason(piece.reason)
        final_usage = None if chunk else self._usage()
        want_logprobs = self.parsed.request.sampling.logprobs
        tokens = self._token_texts(piece.token_ids) if want_logprobs else ()
        if self.parsed.kind == "chat":
            logprobs = oa.chat_logprobs(tokens, piece.logprobs) if want_logprobs else None
            text = piece.text if (piece.text or not chunk or first) else None
            return oa.chat_object(text=text, reason=reason, logprobs=logprobs, chunk=chunk, first=first,
                                  usage_=final_usage, **self.ids)
        logprobs = oa.completion_logprobs(tokens, piece.logprobs, piece.offset) if want_logprobs else None
        return oa.completion_object(text=piece.text, reason=reason, logprobs=logprobs, chunk=chunk,
                                    usage_=final_usage, **self.ids)

    def _token_texts(self, token_ids: tuple[int, ...]) -> tuple[str, ...]:
        """Each token as text, as OpenAI's log probabilities name them."""
        tokenizer = self.generation.tokenizer
        return tuple(tokenizer.decode([t]) if tokenizer is not None else "" for t in token_ids)

    def _usage(self) -> dict[str, int]:
        trace = self.generation.trace
        return oa.usage(trace.prompt_tokens, len(trace.token_ids))


def _join(pieces: list[Piece]) -> Piece:
    return Piece(text="".join(p.text for p in pieces), token_ids=tuple(t for p in pieces for t in p.token_ids),
                 logprobs=tuple(lp for p in pieces for lp in p.logprobs),
                 reason=next((p.reason for p in reversed(pieces) if p.reason), ""), offset=0)


async def _unless_disconnected(receive: Receive, work: Awaitable[None]) -> None:
    """Runs `work` until it ends or the client disconnects (then it is cancelled). Sending to a client that
    has gone raises OSError (uvicorn's ClientDisconnected): that ends it too."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        try:
            await task
        except OSError:
            return  # the client has gone
        except asyncio.CancelledError:
            if not watch.done() or watch.cancelled():  # not the disconnect: we were cancelled ourselves
                raise


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_event(send: Send, body: dict) -> None:
    await send({"type": "http.response.body", "body": f"data: {json.dumps(body)}\n\n".encode(), "more_body": True})


def _typed_error(exc: Exception, parsed: oa.ParsedRequest) -> OpenAIError:
    if isinstance(exc, InvalidRequest):
        param = parsed.openai_param(exc.field)
        return OpenAIError(400, f"{param or exc.field}: {exc.reason}", param=param)
    if isinstance(exc, Overloaded):
        return OpenAIError(429, f"the server is overloaded ({exc}); retry later", type_="rate_limit_error",
                           code="rate_limit_exceeded")
    return _unavailable(exc)


def _unavailable(exc: Exception) -> OpenAIError:
    return OpenAIError(503, f"request lost: {exc}" if str(exc) else "an expert worker is down; retry later",
                       type_="service_unavailable")


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than {limit} bytes (--max-message-bytes)")


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)
