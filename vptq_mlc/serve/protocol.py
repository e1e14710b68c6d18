"""OpenAI request schemas (pydantic) and response bodies for `/v1/chat/completions` and `/v1/completions`.

Why pydantic models rather than dicts: malformed requests are rejected before they reach the engine, with a
message that names the field. Every field is either honoured or refused with a 400 naming it (unknown fields
too, except OpenAI's informational ones such as `user`), so a client never gets an answer to a different
question. Extra sampling knobs that vLLM and MLC-LLM also accept (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids) are supported. docs/api.md lists every field.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vptq_mlc.runtime.frontend import RequestFrontend
from vptq_mlc.runtime.sampling import MAX_TOP_LOGPROBS, SamplingParams

# OpenAI's documented defaults when max_tokens is left out: completions 16; chat "up to the context", which
# would reserve a whole context window of KV pages per request, so we cap it (the client may ask for more).
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 256
MAX_N = 16  # choices per request (each is one engine sequence)
# Fields OpenAI documents as bookkeeping for its own platform: accepted, no effect on the answer.
INFORMATIONAL_FIELDS = frozenset({"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                                  "store"})
LOGPROB_FLOOR = -9999.0  # a logprob with no JSON number (-inf, NaN), as vLLM reports -inf
SEED_LIMIT = 2**63  # seeds are 64-bit signed everywhere else (vLLM, torch); numpy would take any size

# Strict types: "5" or 5.0 for an integer, "0.5" for a float, NaN/Infinity, or 1 for a bool are refused (400) rather
# than coerced, so no later check (the context window, the sampler) sees a value of a type it did not expect.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


def one_line(text: str) -> str:
    """`text` with every character that is not printable (line breaks, other control characters) written as its
    escape (`\\r`, `\\x1c`, `\\u2028`), so a message quoting request text stays one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        message = one_line(message)  # it may quote the request (a field name, a stop string): keep it one line
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields shared by both endpoints. Unknown fields are kept so that `unknown_field` can refuse them."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    n: Int = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    # extensions (vLLM / MLC-LLM names)
    top_k: Int = Field(default=0, ge=0)
    repetition_penalty: Float | None = Field(default=None, gt=0)
    ignore_eos: Bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    return_token_ids: Bool = False  # add the generated ids to each choice as `token_ids` (as vLLM does)
    min_p: Float = Field(default=0.0, ge=0, le=1)
    logit_bias: dict[str, Float] | None = None

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int) -> int:
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}]; send several requests for more choices")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids as strings (e.g. \"50256\"), got {key!r}")
        return bias

    def token_bias(self) -> dict[int, float]:
        """logit_bias as {token id: bias}, values clamped to [-100, 100] as OpenAI does."""
        return {int(k): min(100.0, max(-100.0, float(v))) for k, v in (self.logit_bias or {}).items()}

    def unknown_field(self) -> str | None:
        """The first field this server does not know (refused rather than silently dropped)."""
        extra = [k for k in (self.model_extra or {}) if k not in INFORMATIONAL_FIELDS]
        return extra[0] if extra else None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def new_tokens(self) -> int | None:
        return self.max_tokens


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools (for the chat template)
    tool_call_id: str | None = None  # a tool turn: which call it answers

    def text(self) -> str:
        """Content as one string; only text parts exist for a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise APIError(400, f"content part type {bad[0]!r} is not supported by this text-only model; "
                           "send text parts",
                           param="messages")
        return "".join(p.text or "" for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # our tool calls always follow the schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict, description}."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema for json_schema mode (400 when it is missing)."""
        if self.type != "json_schema":
            return None
        spec = self.json_schema or {}
        if not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("name", ""), str):
            raise APIError(400, "response_format.json_schema must be {\"name\": ..., \"schema\": {...}}",
                           param="response_format")
        unknown = set(spec) - {"name", "schema", "strict", "description"}
        if unknown:
            raise APIError(400, f"response_format.json_schema.{min(unknown)} is not a known field; leave it out",
                           param="response_format")
        return spec.get("schema") or {}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: Bool = True
    response_format: ResponseFormat | None = None

    def unsupported(self) -> str | None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if self.tools and self.tool_mode() != "none" and self.response_format and self.response_format.type != "text":
            raise APIError(400, "response_format and tool calls cannot be combined; drop one", param="response_format")
        return None

    def tool_mode(self) -> str:
        """none | auto | required | the name of the forced function (OpenAI's default: auto when tools exist)."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return "none"
        if choice is None or isinstance(choice, str):
            return choice or "auto"
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in {t.function.name for t in self.tools}:
            raise APIError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                           "{\"name\": <one of tools>}}", param="tool_choice")
        return f"function:{name}"

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, Any]]:
        """Messages for the chat template (OpenAI's `developer` role is the template's `system`)."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out

    def template_tools(self) -> list[dict[str, Any]] | None:
        """Tools as the chat template expects them (transformers' `tools=` argument), if tool calls may happen."""
        if self.tool_mode() == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


class CompletionRequest(_Request):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: Bool = False
    suffix: str | None = None
    best_of: Int | None = None
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def unsupported(self) -> str | None:
        for name, used in (("echo", self.echo), ("suffix", self.suffix),
                           ("best_of", self.best_of not in (None, self.n))):
            if used:
                return name
        return None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (text or token ids); batches of prompts are one request each."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"got {len(p)} prompts; send one prompt per request", param="prompt")
            p = p[0]
        if not p:
            raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
        return p


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


def sampling_kwargs(req: _Request, default_max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for `Engine`'s parameter defaulting (None = the model's default)."""
    return {
        "max_tokens": req.new_tokens() or default_max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "seed": req.seed,
        "stop": list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids),
        "ignore_eos": req.ignore_eos,
        "min_p": req.min_p,
        "logit_bias": req.token_bias(),
        "logprobs": bool(req.logprobs is not None and req.logprobs is not False),
        "top_logprobs": (req.top_logprobs or 0) if isinstance(req, ChatCompletionRequest) else (req.logprobs or 0),
    }


def sampling_params(frontend: RequestFrontend, req: _Request, default_max_tokens: int) -> SamplingParams:
    """The request's SamplingParams, validated, with the model's defaults from mlc-chat-config.json."""
    return frontend.sampling_params(**sampling_kwargs(req, default_max_tokens))


# ---- responses ----------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseBuilder:
    """Bodies of one response (whole or streamed) for the chat or the completions endpoint."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
             token_ids: list[int] | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._base("text_completion")
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**body, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              token_ids: list[int] | None = None) -> dict[str, Any]:
        """One streamed chunk: a text delta, the opening role delta (chat), or the closing finish_reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage` is set: no choices, only usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def choice_chunk(self, index: int, text: str | None = None, finish_reason: str | None = None, role: bool = False,
                     token_ids: list[int] | None = None, logprobs: dict[str, Any] | None = None,
                     tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A streamed chunk of choice `index` (n > 1), with its logprobs and tool-call deltas when present."""
        body = self.chunk(text, finish_reason=finish_reason, role=role, token_ids=token_ids)
        choice = body["choices"][0]
        choice["index"] = index
        choice["logprobs"] = logprobs
        if tool_calls is not None:
            choice["delta"]["tool_calls"] = tool_calls
        return body

    def full_choices(self, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """A whole response with several choices (each from `choice`)."""
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._base(obj), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def choice(self, index: int, text: str | None, finish_reason: str, token_ids: list[int] | None = None,
               logprobs: dict[str, Any] | None = None,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One choice of a whole response; tool calls replace the content (OpenAI: content null)."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls else text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            out = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            out = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if token_ids is not None:
            out["token_ids"] = token_ids
        return out


# ---- logprobs -----------------------------------------------------------------------------------------------


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (byte-level BPE vocabularies spell byte b as chr(table[b]))."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(b)
        else:
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in enumerate(chars)}


def _possible(top: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Alternatives a grammar did not exclude (-inf has no JSON number and was never a candidate) and whose logprob
    is a number (NaN only from non-finite logits)."""
    return [(t, lp) for t, lp in top if math.isfinite(lp)]


def json_logprob(logprob: float) -> float:
    """A chosen token's logprob as a JSON number: -inf and NaN (a token the scores excluded, non-finite logits) have
    none, so they are reported as vLLM reports -inf, -9999.0."""
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TokenText:
    """Each token's bytes and text as OpenAI's logprobs report them."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._byte_level = _byte_level_decoder() if tokenizer.decoder_type() == "ByteLevel" else None
        self._cache: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self._cache:
            self._cache[token] = self._bytes(token)
        return self._cache[token]

    def _bytes(self, token: int) -> bytes:
        entry = self._tok.id_to_token(token) or ""
        if self._byte_level is not None and entry and all(c in self._byte_level for c in entry):
            return bytes(self._byte_level[c] for c in entry)
        if len(entry) == 6 and entry.startswith("<0x") and entry.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(entry[3:5], 16)])
        return self._tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def text(self, token: int) -> str:
        """The token's text; a token that is not valid UTF-8 alone (part of a character) is written as OpenAI
        does, `bytes:\\xe2\\x80`, so distinct tokens keep distinct keys in completions' top_logprobs."""
        raw = self.bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def chat_entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token), "logprob": json_logprob(logprob), "bytes": list(self.bytes(token))}

    def chat_logprobs(self, entries: list[Any]) -> dict[str, Any]:
        """Chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        return {"content": [{**self.chat_entry(e.token, e.logprob),
                             "top_logprobs": [self.chat_entry(t, lp) for t, lp in _possible(e.top)]} for e in entries],
                "refusal": None}

    def completion_logprobs(self, entries: list[Any], offset: int = 0) -> dict[str, Any]:
        """Completions shape: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset (from `offset`)."""
        tokens = [self.text(e.token) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [json_logprob(e.logprob) for e in entries],
                "top_logprobs": [{self.text(t): lp for t, lp in _possible(e.top)} for e in entries],
                "text_offset": offsets}
