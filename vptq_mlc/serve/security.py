"""API key and request limits (body bytes, max_tokens vs the context window) for the HTTP server (single process
and Ray replicas alike).

Why an ASGI middleware and not FastAPI dependencies: it guards every `/v1` route, including ones added later,
answers before the body is parsed, and leaves streaming responses untouched. `/health` and `/metrics` stay
open (load balancers and Prometheus scrape them without the key; they carry no model output).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a full 32k-token prompt as JSON ids is ~250 KB; 4 MiB leaves room
API_KEY_ENV = "VPTQ_MLC_API_KEY"


MAX_PROMPT_CHARS_PER_TOKEN = 32  # generous: BPE vocabularies average 3-5 characters per token, rare ones reach ~30


def max_tokens_error(req: Any, context_window: int | None) -> str | None:
    """Why a request's max_tokens can never be honoured (more new tokens than the context window holds), or None.

    A prompt that does not fit is refused by `Engine.add_request` (400); prompt + max_tokens over the window is
    cut at the window (finish_reason "length"). Malformed bodies are left to the app's validation.
    """
    if context_window is None or not isinstance(req, dict):
        return None
    for name in ("max_completion_tokens", "max_tokens"):
        value = req.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= context_window:
            return (f"{name} {value} does not fit the context window of {context_window} tokens; "
                    f"ask for at most {context_window - 1}")
    return None


def prompt_chars(req: Any) -> int:
    """Characters of prompt text a request carries (completions' `prompt`, chat messages' `content`)."""
    if not isinstance(req, dict):
        return 0
    texts: list[Any] = []
    prompt = req.get("prompt")
    texts += prompt if isinstance(prompt, list) else [prompt]
    messages = req.get("messages")
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            texts += [p.get("text") for p in content if isinstance(p, dict)]
        else:
            texts.append(content)
    return sum(len(t) for t in texts if isinstance(t, str))


def prompt_token_ids(req: Any) -> int:
    """Token ids a completions request carries as its prompt (a list of ids, or a batch of such lists)."""
    prompt = req.get("prompt") if isinstance(req, dict) else None
    if not isinstance(prompt, list):
        return 0
    return max((len(p) for p in prompt if isinstance(p, list)), default=0) + sum(
        1 for p in prompt if isinstance(p, int) and not isinstance(p, bool))


def body_error(body: bytes, context_window: int | None) -> tuple[int, str, str] | None:
    """(status, message, code) for a `/v1` body that must be refused before the app parses or tokenizes it.

    Why here: Python's JSON parser raises RecursionError (not a JSON error) on deep nesting, a lone UTF-16
    surrogate parses but cannot reach the tokenizer, and tokenizing megabytes holds the GIL for seconds, so a
    prompt that cannot fit the context window whatever the tokenizer does is refused by its length in characters.
    Bodies that are simply not JSON are left to the app's validation (same message as for a wrong field).
    """
    try:
        req = json.loads(body)
    except RecursionError:
        return 400, "the request body nests JSON too deeply; send a flat OpenAI request object", "invalid_json"
    except UnicodeDecodeError:
        return 400, "the request body is not valid UTF-8; send UTF-8 encoded JSON", "invalid_json"
    except ValueError:
        return None
    try:
        json.dumps(req, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return (400, ("the request body contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                      "send valid Unicode text"), "invalid_unicode")
    if (why := max_tokens_error(req, context_window)) is not None:
        return 400, why, "context_length_exceeded"
    ids = prompt_token_ids(req)
    if context_window is not None and ids >= context_window:
        return (400, (f"the prompt has {ids} token ids but the context window is {context_window}; shorten the "
                      "prompt"), "context_length_exceeded")
    chars = prompt_chars(req)
    if context_window is not None and chars > context_window * MAX_PROMPT_CHARS_PER_TOKEN:
        return (400, (f"the prompt has {chars} characters, more than a context window of {context_window} tokens "
                      f"can hold (at most {context_window * MAX_PROMPT_CHARS_PER_TOKEN}); shorten the prompt"),
                "context_length_exceeded")
    return None


def secure(app: Any, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
           context_window: int | None = None) -> Any:
    """Install the guard on a FastAPI/Starlette app (before it starts) and return the app."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    count = getattr(app.state, "count_response", None)  # set by serve.app.create_app: refusals show in /metrics
    app.add_middleware(Guard, api_key=api_key or None, max_body_bytes=max_body_bytes, context_window=context_window,
                       count=count)
    return app


class Guard:
    """ASGI middleware: Bearer key on `/v1/*` (when one is set), a cap on request body bytes, and max_tokens
    bounded by the context window (400 before the app parses the body)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, context_window: int | None = None,
                 count: Callable[[str, int], None] | None = None) -> None:
        self.app, self.context_window, self.count = app, context_window, count
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope.get("path", "").startswith("/v1") and not self._authorized(headers):
            await self._refuse(scope, send, 401, "missing or invalid API key; send it as 'Authorization: Bearer <key>'",
                         "invalid_api_key", {"www-authenticate": "Bearer"})
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, send, 413, self._too_large(int(declared)), "request_too_large")
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body, size = [], 0  # read it all (bounded), so a chunked body cannot exceed the cap either
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # client went away before sending its body
                body.append(message.get("body", b""))
                size += len(body[-1])
                if size > self.max_body_bytes:
                    await self._refuse(scope, send, 413, self._too_large(size), "request_too_large")
                    return
                if not message.get("more_body", False):
                    break
            data = b"".join(body)
            if scope.get("path", "").startswith("/v1") and (refused := body_error(data, self.context_window)):
                await self._refuse(scope, send, *refused)
                return
            receive = _replay(data, receive)
        await self.app(scope, receive, send)

    async def _refuse(self, scope: dict[str, Any], send: Any, status: int, message: str, code: str,
                      extra: dict[str, str] | None = None) -> None:
        if self.count is not None:
            self.count(scope.get("path", ""), status)
        await _error(send, status, message, code, extra)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        assert self.key is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _too_large(self, size: int) -> str:
        return (f"the request body ({size}+ bytes) is larger than the server's limit of {self.max_body_bytes} bytes "
                "(--max-body-bytes); send a shorter prompt")


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that hands out the buffered body once, then the real stream (disconnect notices)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Any, status: int, message: str, code: str, extra: dict[str, str] | None = None) -> None:
    """An OpenAI-shaped error body (same shape as protocol.APIError)."""
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                    "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
