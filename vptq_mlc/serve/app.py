"""The OpenAI-compatible HTTP API (FastAPI) in front of one `EngineWorker`.

Handlers validate the request, turn it into prompt ids and `SamplingParams` (tokenizer and chat template are
read-only: short prompts inline, long ones in a worker thread, never on the engine loop), submit it, and
wait for its first event: an acceptance (then the response starts) or a refusal (a 4xx before any byte is
sent). A client that disconnects cancels its request, which frees its KV pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vptq_mlc.errors import VPTQMLCError
from vptq_mlc.runtime.sampling import TokenLogprob
from vptq_mlc.serve.metrics import CONTENT_TYPE, ServeMetrics
from vptq_mlc.serve.protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseBuilder,
    TokenText,
    sampling_params,
)
from vptq_mlc.serve.worker import (
    EngineWorker,
    Event,
    QueueFullError,
    Stream,
    WorkerStoppedError,
)

log = logging.getLogger(__name__)

INLINE_PROMPT_CHARS = 4096  # prompts up to this size are tokenized on the event loop (well under a millisecond)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/tokenize", "/v1/detokenize", "/health",
             "/metrics")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # Hermes / Qwen2.5 tool-call markup (tool_choice auto)


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
    app.state.count_response = lambda path, status: worker.metrics.http_request(_endpoint(path), status)
    frontend = worker.frontend  # tokenizer, chat template, sampling defaults: read-only, used on the event loop
    created = int(time.time())
    token_text = TokenText(frontend.tokenizer)
    grammars = _Grammars(worker)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(e).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.error("request failed", exc_info=e)  # a bug on our side; the client still gets its cause in one line
        return JSONResponse(APIError(500, f"the server failed on this request ({type(e).__name__}: {e})",
                                     type_="server_error").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model {name!r} is not served here; use {model_name!r} (see /v1/models)",
                           param="model", code="model_not_found")

    async def start(ids: list[int], params: Any, constraint: Any = None) -> tuple[Stream, int]:
        try:
            stream = worker.submit(ids, params, constraint) if constraint is not None else worker.submit(ids, params)
        except QueueFullError as e:
            raise APIError(503, str(e), type_="server_error", code="queue_full") from e
        except WorkerStoppedError as e:
            code = "shutting_down" if worker.draining else "engine_stopped"
            raise APIError(503, str(e), type_="server_error", code=code) from e
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
        if (name := body.unknown_field()) is not None:
            raise APIError(400, f"{name} is not a request field this server knows; leave it out", param=name)
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)
        try:
            params = sampling_params(frontend, body, default_max_tokens)  # validated here, once
        except VPTQMLCError as e:
            raise APIError(400, str(e)) from e
        vocab = int(frontend.vocab_size or 0)
        if vocab and (bad := [t for t in params.logit_bias if t >= vocab]):
            raise APIError(400, f"logit_bias token {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias")
        chat = isinstance(body, ChatCompletionRequest)
        tool_mode = body.tool_mode() if chat else "none"
        compiled = await grammars.compile(body, tool_mode) if chat else None
        streams: list[Stream] = []
        prompt_tokens = 0
        try:
            for i in range(body.n):  # one engine sequence per choice; seeded choices get seed, seed + 1, ...
                p = params if body.n == 1 or params.seed is None else \
                    dataclasses.replace(params, seed=(params.seed + i) % 2**63)
                stream, prompt_tokens = await start(ids, p, grammars.constraint(compiled))
                streams.append(stream)
        except BaseException:
            for stream in streams:
                worker.cancel(stream)
            raise
        out = ResponseBuilder(chat, model_name)
        shape = _Shape(out, token_text, tool_mode, body.return_token_ids, params.logprobs,
                       [t.function.name for t in body.tools or []] if chat else [],
                       parallel=not chat or body.parallel_tool_calls)
        if body.stream:
            return StreamingResponse(_sse(worker, streams, shape, prompt_tokens, body.include_usage()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answers = await _collect_unless_disconnected(worker, streams, request)
        if answers is None:
            return Response(status_code=499)  # nobody reads it
        choices = [shape.whole(i, a) for i, a in enumerate(answers)]
        return JSONResponse(out.full_choices(choices, prompt_tokens, sum(len(a.token_ids) for a in answers)))

    async def off_loop(fn: Any, arg: Any, size: int) -> Any:
        """Long prompts are templated/tokenized in a worker thread; short ones inline (a thread hop costs more)."""
        return await run_in_threadpool(fn, arg) if size > INLINE_PROMPT_CHARS else fn(arg)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        messages = body.conversation()
        tools = body.template_tools()
        render = frontend.render_chat if tools is None else (lambda m: frontend.render_chat(m, tools))
        try:
            ids = await off_loop(render, messages, sum(len(m["content"]) for m in messages))
        except VPTQMLCError as e:
            raise APIError(400, str(e), param="messages") from e
        return await respond(request, body, ids, DEFAULT_CHAT_MAX_TOKENS)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompt = body.single_prompt()
        ids = await off_loop(frontend.tokenizer.encode, prompt, len(prompt)) if isinstance(prompt, str) \
            else list(prompt)
        return await respond(request, body, ids, DEFAULT_COMPLETION_MAX_TOKENS)

    @app.post("/v1/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt (or chat messages through the template) to token ids."""
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        try:
            if body.messages is not None:
                chat_body = ChatCompletionRequest.model_construct(messages=body.messages)
                text = frontend.chat_template.render(chat_body.conversation(),
                                                     add_generation_prompt=body.add_generation_prompt) \
                    if frontend.chat_template is not None else frontend.render_chat([])  # the no-template error
                ids = frontend.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
            else:
                add = True if body.add_special_tokens is None else body.add_special_tokens
                ids = await off_loop(lambda p: frontend.tokenizer.encode(p, add_special_tokens=add), body.prompt,
                                     len(body.prompt))
        except VPTQMLCError as e:
            raise APIError(400, str(e), param="messages") from e
        strs = [token_text.text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": frontend.context_window, "tokens": ids, "token_strs": strs}

    @app.post("/v1/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's /detokenize: token ids to text (special tokens kept, as vLLM does)."""
        check_model(body.model)
        vocab = int(frontend.vocab_size or 0) or frontend.tokenizer.vocab_size
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": frontend.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "vptq-mlc", "max_model_len": frontend.context_window}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.draining:  # load balancers stop routing here while running streams finish
            return JSONResponse(APIError(503, "the server is shutting down", type_="server_error",
                                         code="shutting_down").body(), status_code=503)
        if worker.alive():
            return JSONResponse({"status": "ok"})
        reason = f"the engine loop stopped: {worker.failure}" if worker.failure else "the engine loop is not running"
        return JSONResponse(APIError(503, reason, type_="server_error").body(), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render() + _prefix_cache_metrics(worker.engine), media_type=CONTENT_TYPE)

    return app


def _prefix_cache_metrics(engine: Any) -> str:
    """Prefill work and prefix-cache reuse (Prometheus text) of the engine in this process (None: the Ray
    ingress, whose engines live in the replicas)."""
    if not hasattr(engine, "prefill_tokens"):
        return ""
    cache = getattr(engine, "prefix_cache", None)
    rows = [("prompt_tokens_prefilled_total", "counter",
             "Prompt tokens run through the model (cache hits skip theirs).", engine.prefill_tokens),
            ("prefix_cache_lookups_total", "counter", "Admitted requests that looked for a cached prefix.",
             cache.lookups if cache else 0),
            ("prefix_cache_hits_total", "counter", "Requests that started from a cached prefix.",
             cache.hits if cache else 0),
            ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from cached prefixes, not prefilled.",
             cache.hit_tokens if cache else 0),
            ("prefix_cache_entries", "gauge", "Finished sequences kept for their prefixes.",
             len(cache.entries) if cache else 0),
            ("prefix_cache_pages", "gauge", "KV pages the cached prefixes hold (upper bound).",
             cache.pages if cache else 0)]
    return "".join(f"# HELP vptq_mlc_{name} {doc}\n# TYPE vptq_mlc_{name} {kind}\nvptq_mlc_{name} {value}\n"
                   for name, kind, doc, value in rows)


def _validation_error(e: RequestValidationError) -> APIError:
    """pydantic's error list as one line: `field: problem; field: problem`."""
    parts, param = [], None
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)  # the request's field, not pydantic's union-member tags
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        elif not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return APIError(400, "; ".join(parts) or "invalid request", param=param)


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class _Grammars:
    """Structured output for the app: the xgrammar factory (made on first use) and per-request grammars."""

    def __init__(self, worker: Any) -> None:
        self._worker = worker
        self._factory: Any = None
        self._lock = threading.Lock()

    def _get_factory(self) -> Any:
        from vptq_mlc.serve.structured import GrammarFactory

        with self._lock:
            if self._factory is None:
                self._factory = GrammarFactory.for_model(self._worker.frontend)
            return self._factory

    def _compile(self, schema: dict[str, Any] | None) -> Any:
        factory = self._get_factory()
        return factory.json_object() if schema is None else factory.json_schema(schema)

    async def compile(self, body: ChatCompletionRequest, tool_mode: str) -> Any:
        """The compiled grammar the request's output must follow, or None for free text."""
        fmt = body.response_format
        if tool_mode == "required":
            schema: dict[str, Any] | None = {"anyOf": [
                {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters}}
                for t in body.tools or []]}
            param = "tool_choice"
        elif tool_mode.startswith("function:"):
            name = tool_mode.split(":", 1)[1]
            schema = next(t.function.parameters for t in body.tools or [] if t.function.name == name)
            param = "tool_choice"
        elif fmt is not None and fmt.type != "text":
            schema, param = fmt.schema(), "response_format"
        else:
            return None
        if not isinstance(self._worker, EngineWorker):
            raise APIError(400, f"{param} (structured output) is not available with --replicas; serve one replica",
                           param=param)
        try:
            return await run_in_threadpool(self._compile, schema)
        except VPTQMLCError as e:
            raise APIError(400, str(e), param=param) from e

    def constraint(self, compiled: Any) -> Any:
        return None if compiled is None else self._factory.constraint(compiled)


@dataclass
class _Answer:
    """What one choice generated, collected from its events."""

    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)

    def add(self, ev: Event) -> None:
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.logprobs += _logprobs(ev)
        self.finish_reason = ev.finish_reason


def _logprobs(ev: Event) -> list[TokenLogprob]:
    """The event's logprobs as TokenLogprob (events from Ray replicas carry them as plain dicts)."""
    return [e if isinstance(e, TokenLogprob) else TokenLogprob(int(e["token"]), float(e["logprob"]),
                                                                [(int(t), float(lp)) for t, lp in e["top"]])
            for e in ev.logprobs]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Shape:
    """Turns a choice's events into OpenAI bodies: logprobs in the endpoint's shape, tool calls from the text."""

    def __init__(self, out: ResponseBuilder, token_text: TokenText, tool_mode: str, token_ids: bool, logprobs: bool,
                 tool_names: list[str], parallel: bool = True) -> None:
        self.out, self.token_text, self.tool_mode = out, token_text, tool_mode
        self.token_ids, self.with_logprobs, self.tool_names = token_ids, logprobs, tool_names
        self.parallel = parallel  # parallel_tool_calls: false keeps the first call of an `auto` answer

    @property
    def buffered(self) -> bool:
        """Tool calls are known only once the answer is complete, so those responses stream as one delta."""
        return self.tool_mode != "none"

    def logprobs(self, entries: list[Any], offset: int = 0) -> dict[str, Any] | None:
        if not self.with_logprobs:
            return None
        if self.out.chat:
            return self.token_text.chat_logprobs(entries)
        return self.token_text.completion_logprobs(entries, offset)

    def tool_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(remaining content, tool calls) of a finished answer, by tool mode."""
        def call(name: str, arguments: str) -> dict[str, Any]:
            return {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}

        if self.tool_mode.startswith("function:"):  # the grammar made the text the arguments
            return None, [call(self.tool_mode.split(":", 1)[1], text)]
        if self.tool_mode == "required":  # {"name": ..., "arguments": {...}}
            try:
                obj = json.loads(text)
                return None, [call(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False))]
            except (ValueError, KeyError, TypeError):  # cut off by max_tokens: no call, the text as content
                return text, []
        calls, content, rest = [], [], text  # auto: Hermes markup, <tool_call>{"name", "arguments"}</tool_call>
        while (i := rest.find(TOOL_CALL_OPEN)) >= 0 and (j := rest.find(TOOL_CALL_CLOSE, i)) >= 0:
            try:
                obj = json.loads(rest[i + len(TOOL_CALL_OPEN) : j])
                if obj.get("name") not in self.tool_names:
                    raise ValueError("unknown tool")
                calls.append(call(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)))
                content.append(rest[:i])
            except (ValueError, AttributeError):
                content.append(rest[: j + len(TOOL_CALL_CLOSE)])
            rest = rest[j + len(TOOL_CALL_CLOSE) :]
        content.append(rest)
        calls = calls if self.parallel else calls[:1]
        joined = "".join(content).strip()
        return (joined or None, calls) if calls else (text, [])

    def finish(self, reason: str | None, calls: list[dict[str, Any]]) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason

    def whole(self, index: int, a: _Answer) -> dict[str, Any]:
        content, calls = self.tool_calls(a.text) if self.buffered else (a.text, [])
        return self.out.choice(index, content if calls else a.text, self.finish(a.finish_reason, calls) or "stop",
                               a.token_ids if self.token_ids else None, self.logprobs(a.logprobs), calls or None)


async def _sse(worker: EngineWorker, streams: list[Stream], shape: _Shape, prompt_tokens: int,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: role chunk per choice (chat), text chunks, finish chunks, optional usage chunk, [DONE].

    Choices are generated side by side; their chunks interleave, told apart by `index`. If the client goes
    away, Starlette cancels this generator and `finally` cancels the requests.
    """
    out = shape.out
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        while True:
            ev = _coalesce(await stream.next(), stream)
            merged.put_nowait((index, ev))
            if ev.error is not None or ev.finish_reason is not None:
                return

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        if out.chat:
            for i in range(len(streams)):
                yield _data(out.choice_chunk(i, None, role=True))
        open_choices, completion_tokens, failed = len(streams), 0, False
        offsets = [0] * len(streams)
        held = [_Answer() for _ in streams]  # buffered (tool) choices
        while open_choices:
            i, ev = await merged.get()
            if shape.buffered:
                held[i].add(ev)
                if ev.finish_reason is not None and ev.error is None:
                    content, calls = shape.tool_calls(held[i].text)
                    deltas = [{"index": k, **c} for k, c in enumerate(calls)] or None
                    yield _data(out.choice_chunk(i, content if calls else held[i].text, logprobs=shape.logprobs(
                        held[i].logprobs), token_ids=held[i].token_ids if shape.token_ids else None, tool_calls=deltas))
                    ev = dataclasses.replace(ev, finish_reason=shape.finish(ev.finish_reason, calls))
            elif ev.text or ((shape.token_ids or shape.with_logprobs) and ev.token_ids):
                entries = _logprobs(ev)  # tokens that came before an error still go out first
                yield _data(out.choice_chunk(i, ev.text, token_ids=ev.token_ids if shape.token_ids else None,
                                             logprobs=shape.logprobs(entries, offsets[i])))
                offsets[i] += sum(len(shape.token_text.text(e.token)) for e in entries)
            if ev.error is not None:
                yield _data(APIError(ev.status, ev.error, type_="server_error").body())
                failed = True
                break
            if ev.finish_reason is not None:
                yield _data(out.choice_chunk(i, None, finish_reason=ev.finish_reason))
                open_choices -= 1
                completion_tokens += ev.completion_tokens
        if include_usage and not failed:
            yield _data(out.usage_chunk(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            if not stream.done:
                worker.cancel(stream)


def _coalesce(ev: Event, stream: Stream) -> Event:
    """Merge the events already waiting behind `ev` into one, so a client that fell behind gets one chunk
    with several tokens instead of one write per token (less work for both sides under load)."""
    while ev.error is None and ev.finish_reason is None and not stream.queue.empty():
        nxt = stream.queue.get_nowait()
        ev = Event(text=ev.text + nxt.text, token_ids=ev.token_ids + nxt.token_ids,
                   completion_tokens=nxt.completion_tokens or ev.completion_tokens, finish_reason=nxt.finish_reason,
                   logprobs=ev.logprobs + nxt.logprobs, error=nxt.error, status=nxt.status)
    return ev


async def _collect(stream: Stream) -> _Answer:
    """The whole answer of one choice."""
    answer = _Answer()
    while True:
        ev = await stream.next()
        if ev.error is not None:
            raise APIError(ev.status, ev.error, type_="server_error")
        answer.add(ev)
        if ev.finish_reason is not None:
            return answer


async def _collect_unless_disconnected(worker: EngineWorker, streams: list[Stream],
                                       request: Request) -> list[_Answer] | None:
    """Every choice's whole answer, or None (requests cancelled) if the client disconnects first."""
    collect = asyncio.ensure_future(asyncio.gather(*[_collect(s) for s in streams]))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not collect.done():  # client gone (or this handler cancelled): stop generating for nobody
            collect.cancel()
            for stream in streams:
                worker.cancel(stream)
    if collect.done() and not collect.cancelled() and collect.exception() is not None:
        for stream in streams:  # one choice failed: the others are not needed
            if not stream.done:
                worker.cancel(stream)
    return collect.result() if not collect.cancelled() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _endpoint(path: str) -> str:
    """The metrics label of a request path (unknown paths share one label, so scans cannot grow /metrics)."""
    return path if path in ENDPOINTS else "other"


class _CountRequests:
    """ASGI middleware: count responses by endpoint and status (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(scope.get("path", ""))

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_request(endpoint, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counted_send)
