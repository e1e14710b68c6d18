"""What no request, client or flag may do to `vptq-mlc serve`: end the engine loop, stall other clients, hold a
connection forever, cut streams on shutdown, or crash with a traceback.

Real tiny llvm model behind the real app on 127.0.0.1 (ServerThread), plus `vptq-mlc serve` subprocesses for the
signal and command-line checks. docs/malformed-requests.md lists MALFORMED and the flags checked here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner
from serve_process import tiny_server, wait_until_healthy

from vptq_mlc.bench.api import free_port
from vptq_mlc.cli import main as cli_main
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime import Engine
from vptq_mlc.runtime.request import Request

TIMEOUT = httpx.Timeout(60.0)
MAX_BODY = 8 * 1024 * 1024  # above the 4 MB prompt below, so the prompt-length check is what refuses it
READ_TIMEOUT = 2.0
CONTEXT = 1024  # the tiny served model's context window (tests/conftest.py)


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with tiny_server(tiny_served_model, 8, 8192, max_queue=16, max_body_bytes=MAX_BODY, read_timeout=READ_TIMEOUT) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def greedy(prompt: str, max_tokens: int, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}


def sse_events(raw: str) -> list:
    """The data payloads of a server-sent-events body (JSON objects, and the final "[DONE]")."""
    return [json.loads(d) if d.startswith("{") else d for d in re.findall(r"^data: (.*)$", raw, re.MULTILINE)]


def stream_result(raw: str) -> tuple[list[int], str | None, str | None]:
    """(token ids, finish_reason, error message) of one streamed completion."""
    ids, finish, error = [], None, None
    for ev in sse_events(raw)[:-1]:
        if "error" in ev:
            error = ev["error"]["message"]
            continue
        choice = ev["choices"][0]
        ids += choice.get("token_ids") or []
        finish = choice["finish_reason"] or finish
    return ids, finish, error


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)}


def wait_idle(client: httpx.Client, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(client)
        if (m["vptq_mlc_running_requests"] == 0 and m["vptq_mlc_queue_length"] == 0
                and m["vptq_mlc_kv_pages_used"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


# ---- request values: 400 naming the field, never 500, never the engine loop ---------------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER_X = [{"role": "user", "content": "x"}]
# (endpoint, body: dict or raw bytes, status, the field or error code the answer must name)
MALFORMED = [
    (CHAT, {"messages": USER_X, "seed": -1, "max_tokens": 2, "temperature": 1}, 400, "seed"),
    (COMP, {"prompt": "a", "seed": 2**63}, 400, "seed"),
    (COMP, {"prompt": "a", "seed": "7"}, 400, "seed"),
    (COMP, {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    (COMP, {"prompt": "a", "max_tokens": 5.0}, 400, "max_tokens"),
    (COMP, {"prompt": "a", "max_tokens": True}, 400, "max_tokens"),
    (COMP, {"prompt": "a", "max_tokens": "99999"}, 400, "max_tokens"),
    (CHAT, {"messages": USER_X, "max_completion_tokens": 2.5}, 400, "max_completion_tokens"),
    (COMP, {"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    (COMP, {"prompt": "a", "temperature": "0.5"}, 400, "temperature"),
    (COMP, b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    (COMP, {"prompt": "a", "top_p": 0}, 400, "top_p"),
    (COMP, {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    (COMP, {"prompt": "a", "top_k": -1}, 400, "top_k"),
    (COMP, {"prompt": "a", "top_k": 2.5}, 400, "top_k"),
    (COMP, {"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (COMP, b'{"prompt": "a", "repetition_penalty": Infinity}', 400, "repetition_penalty"),
    (COMP, {"prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    (COMP, {"prompt": "a", "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    (COMP, {"prompt": "a", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (COMP, {"prompt": "a", "stop_token_ids": ["2"]}, 400, "stop_token_ids"),
    (COMP, {"prompt": [1, "2"]}, 400, "prompt"),
    (COMP, {"prompt": [1, -3]}, 400, "prompt"),
    (COMP, {"prompt": "a", "n": 1.0}, 400, "n"),
    (COMP, {"prompt": "a", "stream": "yes"}, 400, "stream"),
    (COMP, {"prompt": "a", "ignore_eos": 1}, 400, "ignore_eos"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800abc"}]}', 400, "invalid_unicode"),
    (COMP, b'{"prompt": "abc\\udfff", "max_tokens": 2}', 400, "invalid_unicode"),
    (COMP, b'{"prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json"),
    (COMP, {"prompt": "a" * (CONTEXT * 32 + 1)}, 400, "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "b" * (CONTEXT * 32 + 1)}]}, 400, "context_length_exceeded"),
    (COMP, {"prompt": [5] * 500_000}, 400, "context_length_exceeded"),
]


def test_malformed_values_get_400_naming_the_field(server, client) -> None:
    async def one(c: httpx.AsyncClient, url: str, body, status: int, named: str) -> None:
        r = await (c.post(url, content=body, headers={"content-type": "application/json"})
                   if isinstance(body, bytes) else c.post(url, json=body))
        assert r.status_code == status, (body[:200], r.text[:300])
        err = r.json()["error"]
        assert named in (err["param"], err["code"]) or named in err["message"], (body[:200], err)
        assert "Traceback" not in err["message"] and len(err["message"].splitlines()) == 1, err

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            await asyncio.wait_for(asyncio.gather(*[one(c, *m) for m in MALFORMED]), 60)

    asyncio.run(run())
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post(COMP, json=greedy("The answer is", 3, seed=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert metrics(client)[f'vptq_mlc_http_requests_total{{endpoint="{COMP}",code="400"}}'] >= 20
    wait_idle(client)


# ---- one request's failure stays with it ---------------------------------------------------------------------

POISON_SEED = 424242  # greedy requests ignore the seed; the patched sampler fails only for this one
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():"]
LONG = 200


def test_logprobs_without_a_json_number_are_floored() -> None:
    """-inf and NaN logprobs (non-finite logits) have no JSON number: the chosen token's is reported as vLLM
    reports -inf, alternatives without a number are left out, and the body encodes as strict JSON."""
    from vptq_mlc.runtime.sampling import TokenLogprob
    from vptq_mlc.serve.protocol import LOGPROB_FLOOR, TokenText, json_logprob

    class Tokenizer:  # what TokenText calls, for single-letter tokens
        def decoder_type(self) -> str:
            return "none"

        def id_to_token(self, token: int) -> str:
            return "abcdef"[token]

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "".join("abcdef"[t] for t in ids)

    assert json_logprob(-1.5) == -1.5 and json_logprob(float("nan")) == json_logprob(float("-inf")) == LOGPROB_FLOOR
    text = TokenText(Tokenizer())
    entries = [TokenLogprob(1, float("nan"), [(1, float("nan")), (2, -0.5), (3, float("-inf"))])]
    chat = json.loads(json.dumps(text.chat_logprobs(entries), allow_nan=False))
    assert chat["content"][0]["logprob"] == LOGPROB_FLOOR
    assert [e["token"] for e in chat["content"][0]["top_logprobs"]] == ["c"]
    completion = json.loads(json.dumps(text.completion_logprobs(entries), allow_nan=False))
    assert completion["token_logprobs"] == [LOGPROB_FLOOR] and completion["top_logprobs"] == [{"c": -0.5}]


def test_a_request_whose_sampling_raises_fails_alone(server, client, monkeypatch) -> None:
    alone = {}
    for p in PROMPTS:
        r = client.post(COMP, json=greedy(p, LONG))
        assert r.status_code == 200
        alone[p] = r.json()["choices"][0]["token_ids"]
    real, real_row = Request.sample, Request.sample_row

    def sample(self: Request, logits):  # the host sampler's per-request entry
        if self.params.seed == POISON_SEED and len(self.output_ids) >= 2:
            raise RuntimeError("injected sampler fault")
        return real(self, logits)

    def sample_row(self: Request, vocab_size: int):  # the device sampler's
        if self.params.seed == POISON_SEED and len(self.output_ids) >= 2:
            raise RuntimeError("injected sampler fault")
        return real_row(self, vocab_size)

    monkeypatch.setattr(Request, "sample", sample)
    monkeypatch.setattr(Request, "sample_row", sample_row)

    async def streamed(c: httpx.AsyncClient, body: dict, started: asyncio.Event | None) -> str:
        parts = []
        async with c.stream("POST", COMP, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_text():
                parts.append(chunk)
                if started is not None and "token_ids" in chunk:
                    started.set()
        return "".join(parts)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            started = [asyncio.Event() for _ in PROMPTS]
            good = [asyncio.ensure_future(streamed(c, greedy(p, LONG), e)) for p, e in zip(PROMPTS, started)]
            await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 30)
            poison = greedy("Roses are red", LONG, seed=POISON_SEED)
            bad_stream = asyncio.ensure_future(streamed(c, poison, None))
            bad_whole = await c.post(COMP, json=poison)
            return await asyncio.wait_for(asyncio.gather(*good), 60), await bad_stream, bad_whole

    good, bad_stream, bad_whole = asyncio.run(run())
    for p, raw in zip(PROMPTS, good):
        ids, finish, error = stream_result(raw)
        assert error is None and finish == "length" and ids == alone[p], p
        assert raw.endswith("data: [DONE]\n\n")
    ids, finish, error = stream_result(bad_stream)
    assert error is not None and "injected sampler fault" in error and bad_stream.endswith("data: [DONE]\n\n")
    assert len(ids) == 2  # the tokens before the fault were delivered
    assert bad_whole.status_code == 500 and "injected sampler fault" in bad_whole.json()["error"]["message"]
    assert client.get("/health").json() == {"status": "ok"}
    m = wait_idle(client)
    assert m["vptq_mlc_kv_pages_used"] == 0 and m['vptq_mlc_requests_finished_total{reason="error"}'] >= 2


# ---- a huge prompt is refused without stalling anyone -------------------------------------------------------


def test_4mb_prompt_is_refused_while_a_stream_keeps_its_cadence(server, client) -> None:
    arrivals: list[float] = []
    refused: list[tuple[float, float, httpx.Response]] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c, \
                c.stream("POST", COMP, json={**greedy("Once upon a time", 900), "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
                    first.set()

    def big(body: dict, url: str) -> None:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            t0 = time.perf_counter()
            r = c.post(url, json=body)
            refused.append((t0, time.perf_counter(), r))

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    text = "All work and no play makes Jack a dull boy. " * (4 * 1024 * 1024 // 45)  # 4 MB
    big({"prompt": text, "max_tokens": 4}, COMP)
    big({"messages": [{"role": "user", "content": text}], "max_tokens": 4}, CHAT)
    t.join(60)
    assert not t.is_alive()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) < 0.5, f"a chunk waited {max(gaps):.2f} s"
    for t0, t1, r in refused:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        assert arrivals[0] < t0 and t1 < arrivals[-1], "the stream was not running while the prompt was refused"
    wait_idle(client)


def test_long_text_is_tokenized_with_the_gil_released(tiny_served_model) -> None:
    """What the engine thread and the event loop need while a long prompt (under the length bound) is tokenized:
    another thread keeps running."""
    from tokenizers import Tokenizer as HFTokenizer

    from vptq_mlc.runtime.tokenizer import Tokenizer

    _, model_dir, _ = tiny_served_model
    tok = Tokenizer(model_dir)
    text = "hello world, this is a test. " * 20000
    assert tok.encode(text) == HFTokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
    ticks, done = [], threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    t = threading.Thread(target=tick)
    t.start()
    t0 = time.perf_counter()
    tok.encode(text)
    elapsed = time.perf_counter() - t0
    done.set()
    t.join()
    inside = [x for x in ticks if t0 <= x]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    assert elapsed > 0.1, "the text is too short to tell"
    assert gaps and max(gaps) < elapsed / 2, f"the other thread stopped for {max(gaps):.2f} of {elapsed:.2f} s"


# ---- slow clients are cut off --------------------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it is still open after `seconds`)."""
    sock.settimeout(seconds)
    got = b""
    while True:
        chunk = sock.recv(4096)  # socket.timeout here: the server held the connection
        if not chunk:
            return got
        got += chunk


def test_slow_clients_are_cut_off(server, client) -> None:
    host, port = "127.0.0.1", server.port
    started = time.monotonic()
    with socket.create_connection((host, port)) as silent, socket.create_connection((host, port)) as slow_headers, \
            socket.create_connection((host, port)) as slow_body:
        slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: 1000\r\n\r\n{\"prompt\": ")
        for _ in range(3):  # trickling bytes does not extend the deadline
            time.sleep(0.3)
            slow_headers.sendall(b"X-a: b\r\n")
        assert b" 408 " in _closed_within(slow_headers, READ_TIMEOUT + 3)
        assert _closed_within(slow_body, READ_TIMEOUT + 3) == b""
        _closed_within(silent, READ_TIMEOUT + 3)  # a connection that never sends a byte is closed too
    assert time.monotonic() - started < READ_TIMEOUT + 3
    # a client that sends its request in time is served as before
    r = client.post(COMP, json=greedy("Hello", 2))
    assert r.status_code == 200 and client.get("/health").status_code == 200


# ---- --max-queue counts only what exceeds the batch ----------------------------------------------------------


def test_idle_server_takes_a_full_batch_with_max_queue_0(tiny_served_model) -> None:
    with tiny_server(tiny_served_model, 16, 16 * 1024, max_queue=0) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:

        async def burst(n: int, max_tokens: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT) as ac:
                return await asyncio.gather(*[ac.post(COMP, json=greedy(f"story {i}", max_tokens)) for i in range(n)])

        rs = asyncio.run(burst(16, 4))
        assert [r.status_code for r in rs] == [200] * 16
        # with all 16 slots taken by running streams, one more request is beyond --max-queue 0
        long = {**greedy("Once upon a time", 900), "stream": True}
        with httpx.Client(base_url=s.url, timeout=TIMEOUT) as lc:
            streams = [lc.stream("POST", COMP, json=long) for _ in range(16)]
            opened = [st.__enter__() for st in streams]
            try:
                assert all(r.status_code == 200 for r in opened)
                r = c.post(COMP, json=greedy("one more", 2))
                assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
                assert "--max-queue 0" in r.json()["error"]["message"]
            finally:
                for st in streams:
                    st.__exit__(None, None, None)
        wait_idle(c)
        assert c.post(COMP, json=greedy("again", 2)).status_code == 200


# ---- KV cache sized from free memory -------------------------------------------------------------------------


def _kv_bytes_per_token(model_dir) -> int:
    """K and V, every layer, float32 (the tiny model's dtype), from the model's own config."""
    mc = json.loads((model_dir / "mlc-chat-config.json").read_text())["model_config"]
    assert json.loads((model_dir / "mlc-chat-config.json").read_text())["model_dtype"] == "float32"
    head_dim = mc["hidden_size"] // mc["num_attention_heads"]
    return 2 * mc["num_hidden_layers"] * mc["num_key_value_heads"] * head_dim * 4


def test_kv_cache_default_is_sized_from_free_memory(tiny_served_model, monkeypatch) -> None:
    import vptq_mlc.runtime.engine as engine_module

    _, model_dir, lib = tiny_served_model
    per_token = _kv_bytes_per_token(model_dir)
    # ample memory: every one of the 4 sequences can hold a whole context window at once
    e = Engine(model_dir, lib, device="cpu", max_batch_size=4)
    assert e.max_total_tokens == 4 * CONTEXT and e.kv.total_pages * e.kv.page_size >= 4 * CONTEXT
    greedy = e.frontend.sampling_params(max_tokens=CONTEXT - 10, temperature=0, ignore_eos=True)
    reqs = [e.add_request([5] * 10, greedy) for _ in range(4)]
    e.step()
    assert all(r.state.value == "running" for r in reqs)
    del e, reqs
    # scarce memory: 90% of what is free, in whole pages
    free = 1_000_000
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: free)
    e = Engine(model_dir, lib, device="cpu", max_batch_size=4)
    expected = int(0.9 * free / per_token) // 16 * 16
    assert e.max_total_tokens == expected and expected < 4 * CONTEXT
    # an explicit size that cannot fit is one line naming the option, not a std::bad_alloc
    with pytest.raises(RuntimeLoadError, match=r"--max-total-tokens 1000000000 .* does not fit memory"):
        Engine(model_dir, lib, device="cpu", max_batch_size=4, max_total_tokens=10**9)


# ---- the command line ----------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--max-body-bytes", "0"], "--max-body-bytes"),
    (["--context-window", "0"], "--context-window"),
    (["--max-batch-size", "-4"], "--max-batch-size"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--max-total-tokens", "0"], "--max-total-tokens"),
    (["--max-total-tokens", "1e9"], "--max-total-tokens"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--read-timeout", "0"], "--read-timeout"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--replicas", "0"], "--replicas"),
    (["--max-connections", "0"], "--max-connections"),
    (["--step-token-budget", "-1"], "--step-token-budget"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS)
def test_serve_flag_ranges_are_checked_before_loading(flags, named, tmp_path) -> None:
    r = CliRunner().invoke(cli_main, ["serve", str(tmp_path / "no-model"), *flags])
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output, r.output


def test_chat_context_window_range(tmp_path) -> None:
    r = CliRunner().invoke(cli_main, ["chat", str(tmp_path / "no-model"), "--context-window", "0"])
    assert r.exit_code == 2 and "--context-window" in r.output


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from vptq_mlc.cli import main; main()", *args]


def test_serve_too_many_kv_tokens_is_one_line_and_open_host_warns(tiny_served_model) -> None:
    _, model_dir, lib = tiny_served_model
    cmd = _cli("serve", str(model_dir), "--lib", str(lib), "--device", "cpu", "--host", "0.0.0.0",
               "--max-total-tokens", "1000000000")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "VPTQ_MLC_API_KEY": ""})
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "bad_alloc" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "does not fit memory" in errors[0], r.stderr
    assert re.search(r"WARNING .*0\.0\.0\.0 without an API key", r.stderr), r.stderr


def test_refusals_are_counted_in_metrics(tiny_served_model) -> None:
    with tiny_server(tiny_served_model, 2, 2048, max_queue=4, api_key="k", max_body_bytes=1000) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        assert c.post(COMP, json={"prompt": "a"}).status_code == 401
        assert c.post(COMP, json={"prompt": "a" * 2000}, headers={"Authorization": "Bearer k"}).status_code == 413
        m = metrics(c)
    assert m[f'vptq_mlc_http_requests_total{{endpoint="{COMP}",code="401"}}'] == 1
    assert m[f'vptq_mlc_http_requests_total{{endpoint="{COMP}",code="413"}}'] == 1


# ---- SIGTERM drains ------------------------------------------------------------------------------------------


def test_sigterm_drains_running_streams_then_ends_the_rest(tiny_served_model, tmp_path) -> None:
    _, model_dir, lib = tiny_served_model
    key = "sk-from-a-file"
    (tmp_path / "key").write_text(key + "\n")
    port = free_port()
    drain = 2.0
    cmd = _cli("serve", str(model_dir), "--lib", str(lib), "--device", "cpu", "--port", str(port),
               "--max-batch-size", "1", "--max-total-tokens", "2048", "--drain-timeout", str(drain),
               "--api-key-file", str(tmp_path / "key"))
    assert key not in " ".join(cmd)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "VPTQ_MLC_API_KEY": ""})
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    results: dict[str, str] = {}
    try:
        wait_until_healthy(proc, url)
        assert httpx.post(f"{url}/v1/completions", json=greedy("a", 1), timeout=TIMEOUT).status_code == 401
        longs = [f"b{i}" for i in range(32)]
        accepted = {name: threading.Event() for name in ["short", *longs]}

        def stream(name: str, max_tokens: int) -> None:
            body = {**greedy("Once upon a time", max_tokens), "stream": True}
            with httpx.Client(base_url=url, headers=auth, timeout=TIMEOUT) as c, \
                    c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                accepted[name].set()
                results[name] = "".join(r.iter_text())

        # one batch slot: `short` runs, the 32 long ones (32,000 tokens in all: several seconds even at the tiny
        # model's CPU speed) wait behind it
        threads = [threading.Thread(target=stream, args=("short", 300))]
        threads += [threading.Thread(target=stream, args=(name, 1000)) for name in longs]
        threads[0].start()
        assert accepted["short"].wait(30)
        for t in threads[1:]:
            t.start()
        assert all(e.wait(30) for e in accepted.values())
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/completions", json=greedy("late", 2), headers=auth, timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        for t in threads:
            t.join(60)
        proc.wait(drain + 20)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert proc.returncode == 0 and "Traceback" not in log, log
    assert stopped < drain + 10
    ids, finish, error = stream_result(results["short"])
    assert error is None and finish == "length" and len(ids) == 300 and results["short"].endswith("data: [DONE]\n\n")
    ended = 0
    for name in longs:
        raw = results[name]
        assert raw.endswith("data: [DONE]\n\n"), (name, raw[-300:])
        ids, finish, error = stream_result(raw)
        if error is not None:
            assert "--drain-timeout" in error
            ended += 1
        else:
            assert finish == "length" and len(ids) > 900
    assert ended >= 1  # 32,000 tokens do not fit a 2 s drain
