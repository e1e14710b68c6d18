"""The OpenAI-compatible HTTP API (FastAPI) in front of one `EngineWorker`.

Handlers validate the request, turn it into prompt ids and `SamplingParams` (tokenizer and chat template are
read-only: short prompts inline, long ones in a worker thread, never on the engine loop), submit it, and
wait for its first event: an acceptance (then the response starts) or a refusal (a 4xx before any byte is
sent). A client that disconnects cancels its request, which frees its KV pages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vptq_mlc.errors import VPTQMLCError
from vptq_mlc.serve.metrics import CONTENT_TYPE, ServeMetrics
from vptq_mlc.serve.protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
    sampling_params,
)
from vptq_mlc.serve.worker import EngineWorker, Event, QueueFullError, Stream, WorkerStoppedError

log = logging.getLogger(__name__)

INLINE_PROMPT_CHARS = 4096  # prompts up to this size are tokenized on the event loop (well under a millisecond)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(worker: EngineWorker, model_name: str) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine loop."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="vptq-mlc", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, metrics=worker.metrics)
    engine = worker.engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(e).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} is not served here; use {model_name!r} (see /v1/models)",
                           param="model", code="model_not_found")

    async def start(ids: list[int], params: Any) -> tuple[Stream, int]:
        try:
            stream = worker.submit(ids, params)
        except QueueFullError as e:
            raise APIError(503, str(e), type_="server_error", code="queue_full") from e
        except WorkerStoppedError as e:
            raise APIError(503, str(e), type_="server_error", code="engine_stopped") from e
        try:
            first = await stream.next()
        except asyncio.CancelledError:  # the handler was cancelled (shutdown) while the request was queued
            worker.cancel(stream)
            raise
        if first.error is not None:
            raise APIError(first.status, first.error,
                           type_="invalid_request_error" if first.status < 500 else "server_error")
        assert first.prompt_tokens is not None
        return stream, first.prompt_tokens

    async def respond(request: Request, body: ChatCompletionRequest | CompletionRequest, ids: list[int],
                      default_max_tokens: int) -> Response:
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)
        try:
            params = sampling_params(engine, body, default_max_tokens)
            params.validate()
        except VPTQMLCError as e:
            raise APIError(400, str(e)) from e
        stream, prompt_tokens = await start(ids, params)
        out = ResponseBuilder(isinstance(body, ChatCompletionRequest), model_name)
        if body.stream:
            return StreamingResponse(_sse(worker, stream, out, prompt_tokens, body.include_usage(),
                                          body.return_token_ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _collect_unless_disconnected(worker, stream, request)
        if result is None:
            return Response(status_code=499)  # nobody reads it
        text, finish_reason, token_ids = result
        return JSONResponse(out.full(text, finish_reason, prompt_tokens, len(token_ids),
                                     token_ids if body.return_token_ids else None))

    async def off_loop(fn: Any, arg: Any, size: int) -> Any:
        """Long prompts are templated/tokenized in a worker thread; short ones inline (a thread hop costs more)."""
        return await run_in_threadpool(fn, arg) if size > INLINE_PROMPT_CHARS else fn(arg)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        messages = body.conversation()
        try:
            ids = await off_loop(engine.render_chat, messages, sum(len(m["content"]) for m in messages))
        except VPTQMLCError as e:
            raise APIError(400, str(e), param="messages") from e
        return await respond(request, body, ids, DEFAULT_CHAT_MAX_TOKENS)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompt = body.single_prompt()
        ids = await off_loop(engine.tokenizer.encode, prompt, len(prompt)) if isinstance(prompt, str) else list(prompt)
        return await respond(request, body, ids, DEFAULT_COMPLETION_MAX_TOKENS)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "vptq-mlc", "max_model_len": engine.context_window}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.alive():
            return JSONResponse({"status": "ok"})
        reason = f"the engine loop stopped: {worker.failure}" if worker.failure else "the engine loop is not running"
        return JSONResponse(APIError(503, reason, type_="server_error").body(), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _validation_error(e: RequestValidationError) -> APIError:
    """pydantic's error list as one line: `field: problem; field: problem`."""
    parts, param = [], None
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        elif not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return APIError(400, "; ".join(parts) or "invalid request", param=param)


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(worker: EngineWorker, stream: Stream, out: ResponseBuilder, prompt_tokens: int,
               include_usage: bool, token_ids: bool) -> AsyncIterator[str]:
    """Server-sent events: role chunk (chat), text chunks, finish chunk, optional usage chunk, [DONE].

    If the client goes away, Starlette cancels this generator and `finally` cancels the request.
    """
    try:
        if out.chat:
            yield _data(out.chunk(None, role=True))
        while True:
            ev: Event = _coalesce(await stream.next(), stream)
            if ev.error is not None:
                yield _data(APIError(ev.status, ev.error, type_="server_error").body())
                break
            if ev.text or (token_ids and ev.token_ids):
                yield _data(out.chunk(ev.text, token_ids=ev.token_ids if token_ids else None))
            if ev.finish_reason is not None:
                yield _data(out.chunk(None, finish_reason=ev.finish_reason))
                if include_usage:
                    yield _data(out.usage_chunk(prompt_tokens, ev.completion_tokens))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not stream.done:
            worker.cancel(stream)


def _coalesce(ev: Event, stream: Stream) -> Event:
    """Merge the events already waiting behind `ev` into one, so a client that fell behind gets one chunk
    with several tokens instead of one write per token (less work for both sides under load)."""
    while ev.error is None and ev.finish_reason is None and not stream.queue.empty():
        nxt = stream.queue.get_nowait()
        if nxt.error is not None:
            return nxt
        ev = Event(text=ev.text + nxt.text, token_ids=ev.token_ids + nxt.token_ids,
                   completion_tokens=nxt.completion_tokens, finish_reason=nxt.finish_reason)
    return ev


async def _collect(stream: Stream) -> tuple[str, str, list[int]]:
    """(text, finish_reason, generated ids) of a whole answer."""
    parts: list[str] = []
    ids: list[int] = []
    while True:
        ev = await stream.next()
        if ev.error is not None:
            raise APIError(ev.status, ev.error, type_="server_error")
        parts.append(ev.text)
        ids += ev.token_ids
        if ev.finish_reason is not None:
            return "".join(parts), ev.finish_reason, ids


async def _collect_unless_disconnected(worker: EngineWorker, stream: Stream,
                                       request: Request) -> tuple[str, str, list[int]] | None:
    """The whole answer, or None (request cancelled) if the client disconnects first."""
    collect = asyncio.ensure_future(_collect(stream))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not collect.done():  # client gone (or this handler cancelled): stop generating for nobody
            collect.cancel()
            worker.cancel(stream)
    return collect.result() if not collect.cancelled() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _CountRequests:
    """ASGI middleware: count responses by endpoint and status (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_request(endpoint, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counted_send)
