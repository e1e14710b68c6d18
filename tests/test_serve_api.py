"""The OpenAI API fields real clients send, against the served tiny model, through the official `openai` client.

References are independent of the server: logprobs against transformers' logits on the dense dequantized weights
through torch.log_softmax (tests/reference_model.py); structured output validated with `jsonschema`;
/v1/tokenize against the `tokenizers` library.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from reference_model import reference_model
from serve_process import tiny_server

PROMPT = "Once upon a time"
ATOL = 2e-3  # fp32 TVM vs fp32 torch logits; logprobs of neighbouring tokens differ by far more


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with tiny_server(tiny_served_model, 8, 4096, max_queue=16) as s:
        yield s


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def ref(tiny_served_model):
    return reference_model(tiny_served_model[0])


def ref_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax over the vocabulary after each position of `ids`."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def token_bytes(tokens: list[str]) -> bytes:
    """Completions' token strings back to bytes (`bytes:\\xNN...` for tokens that are part of a character)."""
    return b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode() for t in tokens)


def tokenizer_ids(http: httpx.Client, **body) -> list[int]:
    return http.post("/v1/tokenize", json=body).json()["tokens"]


# ---- logprobs --------------------------------------------------------------------------------------------------


def test_chat_logprobs_match_transformers(oa, http, ref) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    kw = dict(model=oa.models.list().data[0].id, messages=messages, max_tokens=6, temperature=0, logprobs=True,
              top_logprobs=5, extra_body={"ignore_eos": True, "return_token_ids": True})
    r = oa.chat.completions.create(**kw)
    choice = r.choices[0]
    ids = choice.model_extra["token_ids"]
    content = choice.logprobs.content
    assert len(content) == len(ids) == 6
    prompt = tokenizer_ids(http, messages=messages)
    lp = ref_logprobs(ref, prompt + ids)[len(prompt) - 1 : -1]
    for k, entry in enumerate(content):
        assert len(entry.top_logprobs) == 5
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
        assert ids[k] == int(np.argmax(lp[k]))  # greedy: the reference's most likely token
        assert abs(entry.logprob - lp[k, ids[k]]) < ATOL
        ref_top = np.sort(lp[k])[::-1][:5]
        assert np.allclose([t.logprob for t in entry.top_logprobs], ref_top, atol=ATOL)
    joined = b"".join(bytes(e.bytes) for e in content)
    assert joined.decode("utf-8", errors="replace") == choice.message.content, (joined, choice.message.content)

    streamed = []
    for chunk in oa.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in content]


def test_completion_logprobs_match_transformers(oa, ref) -> None:
    prompt = tokenizer_ids_of(oa, PROMPT)
    kw = dict(model=oa.models.list().data[0].id, prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    r = oa.completions.create(**kw)
    lp_obj = r.choices[0].logprobs
    ids = r.choices[0].model_extra["token_ids"]
    lp = ref_logprobs(ref, prompt + ids)[len(prompt) - 1 : -1]
    assert len(lp_obj.tokens) == len(lp_obj.token_logprobs) == len(lp_obj.top_logprobs) == 5
    for k in range(5):
        assert ids[k] == int(np.argmax(lp[k]))
        assert abs(lp_obj.token_logprobs[k] - lp[k, ids[k]]) < ATOL
        top = lp_obj.top_logprobs[k]
        assert len(top) <= 3 and max(top.values()) == lp_obj.token_logprobs[k]
        assert lp_obj.tokens[k] in top
    assert lp_obj.text_offset == [sum(len(t) for t in lp_obj.tokens[:k]) for k in range(5)]
    assert token_bytes(lp_obj.tokens).decode("utf-8", errors="replace") == r.choices[0].text
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in oa.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            for key in streamed:
                streamed[key] += getattr(chunk.choices[0].logprobs, key)
    assert streamed == {"tokens": lp_obj.tokens, "token_logprobs": lp_obj.token_logprobs,
                        "text_offset": lp_obj.text_offset}


def tokenizer_ids_of(oa: openai.OpenAI, text: str) -> list[int]:
    """Prompt ids through the tokenizers library directly."""
    from tokenizers import Tokenizer

    model_dir = oa._server_model_dir  # type: ignore[attr-defined]
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


@pytest.fixture(autouse=True)
def _model_dir_on_client(oa, tiny_served_model):
    oa._server_model_dir = tiny_served_model[1]  # type: ignore[attr-defined]


# ---- n, logit_bias, refused fields --------------------------------------------------------------------------


def test_n_choices_and_logit_bias(oa, http) -> None:
    model = oa.models.list().data[0].id
    extra = {"ignore_eos": True, "return_token_ids": True}
    one = oa.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=extra)
    two = oa.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, n=2, extra_body=extra)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(c.text == one.choices[0].text for c in two.choices)
    assert two.usage.completion_tokens == 12 and two.usage.prompt_tokens == one.usage.prompt_tokens
    sampled = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                         temperature=1.0, n=3, seed=5, extra_body=extra)
    ids = [c.model_extra["token_ids"] for c in sampled.choices]
    assert len(ids) == 3 and len({tuple(i) for i in ids}) > 1  # different draws per choice
    chunks = list(oa.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                             temperature=1.0, n=3, seed=5, stream=True, extra_body=extra))
    streamed = {i: [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])
                    if c.choices and c.choices[0].index == i] for i in range(3)}
    assert [streamed[i] for i in range(3)] == ids  # seeded: the same draws streamed
    assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) == \
        ["length"] * 3

    forced = one.choices[0].model_extra["token_ids"][0] + 1
    r = oa.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0,
                              logit_bias={str(forced): 100}, extra_body=extra)
    assert r.choices[0].model_extra["token_ids"] == [forced] * 5
    r = oa.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0.8, seed=1,
                              logit_bias={str(forced): 250}, extra_body=extra)  # clamped to 100, still forces
    assert r.choices[0].model_extra["token_ids"] == [forced] * 5

    for body, field in [({"prompt": "a", "frobnicate": 1}, "frobnicate"), ({"prompt": "a", "logit_bias": {"x": 1}},
                        "logit_bias"), ({"prompt": "a", "logit_bias": {"999999": 1}}, "logit_bias"),
                        ({"prompt": "a", "n": 0}, "n"), ({"prompt": "a", "echo": True}, "echo")]:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and field in r.json()["error"]["message"] + str(r.json()["error"]["param"]), r.text
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "functions": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions"
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "user": "me"})  # informational: accepted
    assert r.status_code == 200


# ---- structured output ------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_json_schema_and_json_object(oa) -> None:
    model = oa.models.list().data[0].id
    messages = [{"role": "user", "content": "Give me a person as JSON"}]
    free = oa.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
    with pytest.raises(ValueError):  # the random model's free text is not JSON: only the grammar makes it valid
        json.loads(free.choices[0].message.content)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for temperature in (0, 1.0):
        r = oa.chat.completions.create(model=model, messages=messages, max_tokens=120, temperature=temperature, seed=3,
                                       response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model=model, messages=messages, max_tokens=120, temperature=0, response_format=fmt, stream=True) if c.choices)
    jsonschema.validate(json.loads(streamed), SCHEMA)
    r = oa.chat.completions.create(model=model, messages=messages, max_tokens=200, temperature=0,
                                   response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_structured_and_free_requests_share_a_batch(server, http) -> None:
    """A grammar-constrained request in the same batch as free ones leaves their tokens unchanged."""
    import asyncio

    free = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
            for p in ("The quick brown fox", "In the beginning", "Dear Sir or Madam,")]
    alone = [http.post("/v1/completions", json=b).json()["choices"][0]["token_ids"] for b in free]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    structured = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 120, "temperature": 0,
                  "response_format": fmt}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            posts = [c.post("/v1/chat/completions", json=structured)]
            posts += [c.post("/v1/completions", json=b) for b in free]
            return await asyncio.wait_for(asyncio.gather(*posts), 60)

    steps = lambda: float(re.search(r"^vptq_mlc_engine_steps_total (\S+)$", http.get("/metrics").text, re.M)[1])  # noqa: E731
    before = steps()
    first, *rest = asyncio.run(main())
    jsonschema.validate(json.loads(first.json()["choices"][0]["message"]["content"]), SCHEMA)
    assert [r.json()["choices"][0]["token_ids"] for r in rest] == alone
    assert steps() - before < 24 + first.json()["usage"]["completion_tokens"]  # they ran side by side


def test_forced_tool_calls_validate(oa) -> None:
    model = oa.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for stream in (False, True):
            kw = dict(model=model, messages=messages, max_tokens=120, temperature=0, tools=[WEATHER, TIME],
                      tool_choice=choice)
            if stream:
                chunks = list(oa.chat.completions.create(**kw, stream=True))
                deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
                calls = [(d.function.name, d.function.arguments) for d in deltas]
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            else:
                r = oa.chat.completions.create(**kw)
                assert r.choices[0].message.content is None
                calls = [(tc.function.name, tc.function.arguments) for tc in r.choices[0].message.tool_calls]
                finish = [r.choices[0].finish_reason]
            assert finish == ["tool_calls"] and len(calls) == 1
            name, arguments = calls[0]
            if isinstance(choice, dict):
                assert name == "get_time"
            jsonschema.validate(json.loads(arguments), schemas[name])
    r = oa.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, tools=[WEATHER],
                                   tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_auto_tool_calls_are_parsed_from_hermes_markup() -> None:
    from vptq_mlc.serve.app import _Shape

    shape = _Shape(None, None, "auto", False, False, ["get_weather"])  # type: ignore[arg-type]
    text = 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = shape.tool_calls(text)
    assert content == "Let me look." and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert shape.tool_calls("plain answer") == ("plain answer", [])
    two = text + ' <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert [json.loads(c["function"]["arguments"])["city"] for c in shape.tool_calls(two)[1]] == ["Paris", "Oslo"]
    single = _Shape(None, None, "auto", False, False, ["get_weather"], parallel=False)  # type: ignore[arg-type]
    assert len(single.tool_calls(two)[1]) == 1
    bad = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'  # not one of the tools: left as text
    assert shape.tool_calls(bad) == (bad, [])


def test_structured_output_without_xgrammar_is_a_400_naming_the_extra(monkeypatch, tiny_served_model) -> None:
    import importlib.util

    from vptq_mlc.serve import structured

    monkeypatch.setattr(structured, "_api", None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "xgrammar" else real_find_spec(name, *a))
    with pytest.raises(structured.StructuredOutputUnavailable, match=r"vptq-mlc\[structured\]"):
        structured.xgrammar_api()
    with tiny_server(tiny_served_model, 2, max_queue=2) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "response_format": {"type": "json_object"}}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        assert "vptq-mlc[structured]" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={**body, "response_format": {"type": "text"}})
        assert r.status_code == 200  # free text needs no xgrammar


# ---- tokenize / detokenize --------------------------------------------------------------------------------------


def test_tokenize_detokenize(http, tiny_served_model) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_served_model[1] / "tokenizer.json"))
    text = "Hello there, tokenizer!"
    r = http.post("/v1/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text).ids and r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert len(r["token_strs"]) == r["count"]
    assert http.post("/v1/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": tok.decode(r["tokens"])}
    chat = http.post("/v1/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    assert "<|im_start|>" in tok.decode(chat["tokens"], skip_special_tokens=False)
    assert http.post("/v1/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert http.post("/v1/tokenize", json={}).status_code == 400
