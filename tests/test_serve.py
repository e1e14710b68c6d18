"""`vptq-mlc serve` on the real path: synthetic checkpoint -> convert -> compile (llvm) -> Engine -> HTTP.

Greedy tokens of a request served alone are checked against transformers on the dense dequantized weights
(tests/reference_model.py); inside a batch of 16 concurrent different requests they must be the same. The server
runs in this process on 127.0.0.1 and an OS-chosen port (ServerThread); every client loop is bounded in count and
time. KV pages and finish reasons are read from /metrics, the way an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from reference_model import reference_greedy, reference_model
from serve_process import tiny_server, wait_until_healthy

from vptq_mlc.bench.api import free_port, stop_server
from vptq_mlc.runtime import Engine
from vptq_mlc.serve.server import ServerThread

PROMPTS = [
    "The quick brown fox", "Hello there, how are you doing today? I am", "A", "Once upon a time",
    "In the beginning", "The capital of France is", "def main():", "1, 2, 3, 4,", "Dear Sir or Madam,",
    "It was a dark and stormy night", "Roses are red", "The answer is", "Q: why? A:", "story world",
    "Lorem ipsum dolor", "Breaking news:",
]
GEN = 12  # new tokens per greedy request
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with tiny_server(tiny_served_model, 32, 8192, max_queue=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def greedy(prompt: str, chat: bool = False, **kw) -> dict:
    body = {"temperature": 0, "max_tokens": GEN, "ignore_eos": True, "return_token_ids": True, **kw}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def answer(body: dict) -> tuple[str, list[int]]:
    choice = body["choices"][0]
    return (choice["message"]["content"] if "message" in choice else choice["text"]), choice["token_ids"]


@pytest.fixture(scope="module")
def alone(client) -> dict[tuple[str, bool], tuple[str, list[int]]]:
    """Every prompt served alone (one request at a time), as completion and as chat: (text, token ids)."""
    out = {}
    for chat in (False, True):
        for p in PROMPTS:
            r = client.post(path(chat), json=greedy(p, chat))
            assert r.status_code == 200, r.text
            out[(p, chat)] = answer(r.json())
    return out


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def wait_metrics(client: httpx.Client, ok, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(client)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def finished(m: dict[str, float], reason: str) -> float:
    return m.get(f'vptq_mlc_requests_finished_total{{reason="{reason}"}}', 0.0)


def idle(m: dict[str, float]) -> bool:
    return m["vptq_mlc_running_requests"] == 0 and m["vptq_mlc_kv_pages_used"] == 0 and m["vptq_mlc_queue_length"] == 0


async def gather_bounded(*coros, timeout: float = 60.0):
    return await asyncio.wait_for(asyncio.gather(*coros), timeout)


# ---- correctness -------------------------------------------------------------------------------------------


def test_greedy_alone_matches_transformers(tiny_served_model, client, alone) -> None:
    ref = reference_model(tiny_served_model[0])
    for p in PROMPTS[:4]:
        ids = _encode(tiny_served_model[1], p)
        assert client.post("/v1/completions", json=greedy(p, max_tokens=1)).json()["usage"]["prompt_tokens"] == len(ids)
        assert alone[(p, False)][1] == reference_greedy(ref, ids, GEN)


def _encode(model_dir: Path, text: str) -> list[int]:
    """Prompt ids through the tokenizers library directly (what the server must have used)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def test_batch_of_16_equals_alone(server, client, alone) -> None:
    steps0 = metrics(client)["vptq_mlc_engine_steps_total"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            return await gather_bounded(*[c.post(path(i % 2 == 1), json=greedy(p, i % 2 == 1))
                                          for i, p in enumerate(PROMPTS)])

    responses = asyncio.run(main())
    for i, (p, r) in enumerate(zip(PROMPTS, responses)):
        assert r.status_code == 200, r.text
        assert answer(r.json()) == alone[(p, i % 2 == 1)]
        assert r.json()["choices"][0]["finish_reason"] == "length"
    steps = metrics(client)["vptq_mlc_engine_steps_total"] - steps0
    assert steps < len(PROMPTS) * GEN / 2, f"{steps} engine steps: the requests were not batched"


def test_per_request_sampling_stop_max_tokens_seed(server, client, alone) -> None:
    text, ids = alone[(PROMPTS[0], False)]
    r = client.post("/v1/completions", json=greedy(PROMPTS[0], max_tokens=5)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5
    assert r["choices"][0]["token_ids"] == ids[:5]

    stop_tok = ids[4]
    r = client.post("/v1/completions", json=greedy(PROMPTS[0], stop_token_ids=[stop_tok])).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["token_ids"] == ids[: ids.index(stop_tok)]

    stop = next(text[i:i + 3] for i in range(3, len(text) - 3) if text[i:i + 3].strip())
    r = client.post("/v1/completions", json=greedy(PROMPTS[0], stop=[stop, "\x00never"])).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == text[: text.index(stop)]

    r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "temperature": 0, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens for completions

    def sampled(seed: int) -> dict:
        return {"prompt": PROMPTS[1], "temperature": 0.9, "top_k": 50, "seed": seed, "max_tokens": GEN,
                "ignore_eos": True, "return_token_ids": True}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            return await gather_bounded(*[c.post("/v1/completions", json=sampled(s)) for s in (7, 7, 8)])

    first = client.post("/v1/completions", json=sampled(7)).json()["choices"][0]["token_ids"]
    a, b, c = (r.json()["choices"][0]["token_ids"] for r in asyncio.run(main()))
    assert a == b == first  # the seed decides, not the batch
    assert c != a


# ---- streaming under load ----------------------------------------------------------------------------------


def parse_sse(raw: str, chat: bool) -> tuple[str, list[int], dict]:
    """Check the event stream's framing and schema; return (text, token ids, usage)."""
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    chunks = []
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev, ev
        chunks.append(json.loads(ev[len("data: "):]))
    obj = "chat.completion.chunk" if chat else "text_completion"
    assert {c["object"] for c in chunks} == {obj} and len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    body = chunks[:-1]
    finishes = [c["choices"][0]["finish_reason"] for c in body]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    if chat:
        assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    else:
        text = "".join(c["choices"][0]["text"] for c in body)
    ids = [t for c in body for t in c["choices"][0].get("token_ids", [])]
    return text, ids, usage


def test_64_concurrent_streams(server, client, alone) -> None:
    n = 64

    async def one(c: httpx.AsyncClient, i: int) -> str:
        chat = i % 2 == 1
        body = greedy(PROMPTS[i % len(PROMPTS)], chat, stream=True, stream_options={"include_usage": True})
        async with c.stream("POST", path(chat), json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return "".join([part async for part in r.aiter_text()])

    async def main():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as c:
            return await gather_bounded(*[one(c, i) for i in range(n)])

    raws = asyncio.run(main())
    assert len(raws) == n
    for i, raw in enumerate(raws):
        chat = i % 2 == 1
        text, ids, usage = parse_sse(raw, chat)
        assert (text, ids) == alone[(PROMPTS[i % len(PROMPTS)], chat)], f"stream {i}"
        assert usage["completion_tokens"] == GEN
    assert idle(wait_metrics(client, idle))


# ---- cancellation, errors, back-pressure -------------------------------------------------------------------


def test_cancelled_stream_frees_kv_pages(server, client) -> None:
    before = metrics(client)
    body = {"prompt": PROMPTS[3], "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                during = metrics(client)
                break  # got the first token; leaving the loop closes the connection
    assert during["vptq_mlc_kv_pages_used"] > 0 and during["vptq_mlc_running_requests"] == 1
    m = wait_metrics(client, lambda m: finished(m, "cancelled") > finished(before, "cancelled") and idle(m))
    assert finished(m, "cancelled") == finished(before, "cancelled") + 1
    assert finished(m, "length") == finished(before, "length")  # it did not run to the end
    assert idle(m) and m["vptq_mlc_kv_pages_free"] == m["vptq_mlc_kv_pages_total"]

    # a non-streaming client that gives up is cancelled too
    before = m
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False},
                   timeout=httpx.Timeout(10.0, read=0.05))
    m = wait_metrics(client, lambda m: finished(m, "cancelled") > finished(before, "cancelled") and idle(m))
    assert finished(m, "cancelled") == finished(before, "cancelled") + 1 and idle(m)


BAD = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", {}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, 400),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "a", "n": 17}, 400),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400),
    ("/v1/completions", {"prompt": [1, 99999]}, 400),  # outside the vocabulary
    ("/v1/completions", {"prompt": "x " * 1100}, 400),  # longer than the context window
    ("/v1/completions", {"prompt": "a", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404),
]


def test_malformed_requests_get_4xx_and_others_are_unaffected(server, client, alone) -> None:
    async def good(c: httpx.AsyncClient, p: str) -> httpx.Response:
        return await c.post("/v1/completions", json=greedy(p))

    async def bad(c: httpx.AsyncClient, url: str, body, status: int) -> None:
        r = await (c.post(url, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes)
                   else c.post(url, json=body))
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"], err
        assert err["type"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            goods = [asyncio.ensure_future(good(c, p)) for p in PROMPTS[:6]]
            await gather_bounded(*[bad(c, *b) for b in BAD])
            r = await c.get("/v1/completions")
            assert r.status_code == 405 and "error" in r.json()
            return await gather_bounded(*goods)

    for p, r in zip(PROMPTS, asyncio.run(main())):
        assert r.status_code == 200 and answer(r.json()) == alone[(p, False)]
    assert client.get("/health").json() == {"status": "ok"}
    m = metrics(client)
    assert m['vptq_mlc_http_requests_total{endpoint="/v1/completions",code="404"}'] >= 1
    assert idle(wait_metrics(client, idle))


def test_queue_full_gives_503(tiny_served_model) -> None:
    long = {"prompt": PROMPTS[0], "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with tiny_server(tiny_served_model, 1, max_queue=1) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        with c.stream("POST", "/v1/completions", json=long) as a:  # running: the only batch slot
            a_lines = a.iter_lines()  # kept open: closing this iterator would close the connection
            next(line for line in a_lines if line.startswith("data: {"))
            with c.stream("POST", "/v1/completions", json={**long, "max_tokens": 4}) as b:  # waits: fills the queue
                assert b.status_code == 200
                r = c.post("/v1/completions", json={**long, "stream": False})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert "--max-queue 1" in r.json()["error"]["message"] and r.json()["error"]["code"] == "queue_full"
                a.close()  # A leaves, B is admitted and finishes
                raw = b.read().decode()
        assert raw.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in raw
        r = c.post("/v1/completions", json={**long, "stream": False, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- clients and the command line --------------------------------------------------------------------------


def test_official_openai_client(server, alone) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = oa.models.list().data
    assert model.id == server.model_name
    extra = {"ignore_eos": True}
    p = PROMPTS[5]
    chat = oa.chat.completions.create(model=model.id, messages=[{"role": "user", "content": p}], max_tokens=GEN,
                                      temperature=0, extra_body=extra)
    assert chat.choices[0].message.content == alone[(p, True)][0]
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == GEN
    parts, usage = [], None
    for chunk in oa.chat.completions.create(model=model.id, messages=[{"role": "user", "content": p}],
                                            max_tokens=GEN, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == alone[(p, True)][0] and usage.completion_tokens == GEN
    comp = oa.completions.create(model=model.id, prompt=p, max_tokens=GEN, temperature=0, extra_body=extra)
    assert comp.choices[0].text == alone[(p, False)][0] and comp.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model=model.id, prompt=p, max_tokens=GEN, temperature=0, stream=True, extra_body=extra))
    assert streamed == alone[(p, False)][0]
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=model.id, prompt=p, temperature=5)
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="not-this-one", prompt=p)


def test_cli_serve(tiny_served_model) -> None:
    _, model_dir, lib = tiny_served_model
    port = free_port()
    cmd = [sys.executable, "-c", "from vptq_mlc.cli import main; main()", "serve", str(model_dir), "--lib", str(lib),
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", "4", "--max-queue", "8",
           "--step-token-budget", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url)
        r = httpx.post(f"{url}/v1/completions", json=greedy(PROMPTS[0], max_tokens=3), timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == model_dir.name
    finally:
        stop_server(proc, 30)
    assert proc.returncode == 0


def test_failed_step_answers_500_and_serving_continues(tiny_served_model, monkeypatch) -> None:
    _, model_dir, lib = tiny_served_model
    engine = Engine(model_dir, lib, device="cpu", max_batch_size=4)
    calls = []

    def flaky(real):
        def call(*args):
            calls.append(1)
            if len(calls) == 2:  # the second decode call, whichever library function the engine picked
                raise RuntimeError("injected device fault")
            return real(*args)
        return call

    monkeypatch.setattr(engine, "_decode", flaky(engine._decode))  # batch_decode
    # and the static-size decode functions (decode for a single sequence, batch_decode_b<n>)
    monkeypatch.setattr(engine, "_static_decode", {n: flaky(f) for n, f in engine._static_decode.items()})
    with ServerThread(engine, max_queue=4) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/completions", json=greedy(PROMPTS[0]))
        assert r.status_code == 500 and "injected device fault" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json=greedy(PROMPTS[0], max_tokens=3))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        m = wait_metrics(c, idle)
        assert idle(m) and finished(m, "error") == 1 and c.get("/health").status_code == 200
