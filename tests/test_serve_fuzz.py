"""Random request bodies against the real server (tiny llvm model, in-process `ServerThread`): every field a client
may send, each either a value of its own type and range or any JSON at all. Whatever arrives, the answer is a 200 or
a 4xx whose error is one line without a traceback, never a 5xx; streams end with `[DONE]`; and the server still
answers a plain request afterwards. Derandomized, so CI runs the same bodies every time."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_process import tiny_server

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
EXAMPLES = 300

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


small_text = st.text(max_size=12)
content = st.one_of(small_text, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                 "text": small_text}), max_size=2))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]), "content": content},
    optional={"tool_call_id": small_text, "name": small_text})
user_message = st.fixed_dictionaries({"role": st.just("user"), "content": small_text})
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "f", ""]),
     "parameters": st.sampled_from([{"type": "object", "properties": {"city": {"type": "string"}}}, {}])})})
schema = st.sampled_from([{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                          {"type": "string", "maxLength": 3}, {"type": "nonsense"}, {}])
response_format = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}]),
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": st.just("r"), "schema": schema})}))

# Per field: (values a valid request may carry, values around and past its range).
COMMON = {
    "max_tokens": (st.integers(0, 4), st.integers(-2, 2**40)),
    "temperature": (st.floats(0, 2), st.floats(-1, 1e6)),
    "top_p": (st.floats(0.01, 1), st.floats(-0.5, 1.5)),
    "top_k": (st.integers(0, 40), st.integers(-3, 2**40)),
    "min_p": (st.floats(0, 1), st.floats(-0.5, 1.5)),
    "seed": (st.integers(0, 2**63 - 1), st.integers(-(2**64), 2**65)),
    "n": (st.integers(1, 3), st.integers(-1, 100)),
    "stop": (st.one_of(small_text, st.lists(small_text, max_size=4)), st.lists(any_json, max_size=6)),
    "logit_bias": (st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=3),
                   st.dictionaries(st.text(max_size=4), any_json, max_size=3)),
    "stream": (st.booleans(), st.integers(0, 1)),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}),
                       st.dictionaries(st.text(max_size=6), any_json, max_size=2)),
    "presence_penalty": (st.floats(-2, 2), st.floats(-10, 10)),
    "frequency_penalty": (st.floats(-2, 2), st.floats(-10, 10)),
    "repetition_penalty": (st.floats(0.5, 2), st.floats(-1, 10)),
    "ignore_eos": (st.booleans(), any_json),
    "stop_token_ids": (st.lists(st.integers(0, 300), max_size=3), st.lists(st.integers(-5, 2**40), max_size=3)),
    "return_token_ids": (st.booleans(), any_json),
}
CHAT_ONLY = {
    "max_completion_tokens": (st.integers(0, 4), st.integers(-2, 2**40)),
    "logprobs": (st.booleans(), any_json),
    "top_logprobs": (st.integers(0, 20), st.integers(-2, 100)),
    "response_format": (response_format, any_json),
    "tools": (st.lists(tool, max_size=2), st.lists(any_json, max_size=2)),
    "tool_choice": (st.one_of(st.sampled_from(["none", "auto", "required"]), st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])})})),
        any_json),
    "parallel_tool_calls": (st.booleans(), any_json),
}
COMPLETION_ONLY = {
    "logprobs": (st.integers(0, 5), st.integers(-2, 100)),
    "best_of": (st.none(), st.integers(-1, 5)),
}


def body(first: tuple[str, tuple], fields: dict[str, tuple], wild: bool) -> st.SearchStrategy:
    """A request body: `wild` = each field's value from around and past its range, or any JSON at all, plus a
    field the API refuses or does not know; else only values a valid request may carry (so requests reach the
    engine)."""
    pick = (lambda pair: st.one_of(pair[1], any_json)) if wild else (lambda pair: pair[0])
    name, pair = first
    extra = {"echo": any_json, "suffix": any_json, "functions": any_json, "model": any_json, "x_unknown": any_json}
    return st.fixed_dictionaries({name: pick(pair)},
                                 optional={**{k: pick(v) for k, v in fields.items()}, **(extra if wild else {})})


chat_first = ("messages", (st.lists(st.one_of(user_message, message), min_size=1, max_size=3),
                           st.lists(any_json, max_size=3)))
comp_first = ("prompt", (st.one_of(small_text.filter(str.strip), st.lists(st.integers(0, 300), min_size=1,
                                                                         max_size=6)),
                         st.one_of(st.lists(st.integers(-(2**40), 2**40), max_size=6), any_json)))
request = st.one_of(*(st.tuples(st.just(url), body(first, {**COMMON, **only}, wild))
                      for url, first, only in ((CHAT, chat_first, CHAT_ONLY), (COMP, comp_first, COMPLETION_ONLY))
                      for wild in (False, True)))


@pytest.fixture(scope="module")
def client(tiny_served_model):
    with tiny_server(tiny_served_model, 8, 8192, max_queue=32) as server, \
            httpx.Client(base_url=server.url, timeout=httpx.Timeout(60.0)) as c:
        yield c


def _one_line_error(r: httpx.Response, body: dict) -> None:
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], (body, r.text[:300])
    assert "Traceback" not in err["message"] and len(err["message"].splitlines()) == 1, (body, err)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(req=request)
# found by this test: a field name with a line break, quoted in the validation message, split it over two lines
@example(req=(CHAT, {"messages": [], "logit_bias": {"\r": None}}))
@example(req=(COMP, {"prompt": "x", "stop": 5, "logit_bias": {"a\u2028b": "c"}}))
# found by this test: a temperature whose float32 inverse overflows left the compiled sampler no kept token (an
# uninitialised token id, NaN logprobs that JSON cannot carry)
@example(req=(CHAT, {"messages": [{"role": "user", "content": "x"}], "temperature": 1e-39, "logprobs": True,
                     "top_logprobs": 3, "max_tokens": 4}))
@example(req=(COMP, {"prompt": "x", "temperature": 2e-38, "logprobs": 2, "max_tokens": 4}))
def test_no_request_body_gets_a_server_error(client: httpx.Client, req) -> None:
    url, body = req
    r = client.post(url, json=body)
    assert r.status_code < 500, (url, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        _one_line_error(r, body)
        return
    assert r.status_code == 200, (url, body, r.status_code)
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", (url, body, r.text[-300:])
        for ev in events[:-1]:
            assert "error" not in json.loads(ev), (url, body, ev)
    else:
        assert r.json()["choices"], (url, body, r.text[:300])


def test_the_server_still_serves_after_the_fuzz(client: httpx.Client) -> None:
    r = client.post(COMP, json={"prompt": "The answer is", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").json() == {"status": "ok"}
