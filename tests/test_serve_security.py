"""API key and request limits of `vptq-mlc serve` (single process; tests/test_cluster.py repeats them on Ray).

Real tiny llvm model behind the real app on 127.0.0.1; each check is one bounded HTTP call.
"""

from __future__ import annotations

import httpx
import pytest
from serve_process import tiny_server

KEY = "sk-test-0123456789"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with tiny_server(tiny_served_model, 4, 4096, max_queue=16, api_key=KEY, max_body_bytes=MAX_BODY) as s:
        yield s


def check_auth_and_limits(url: str, context_window: int, max_body: int, key: str) -> None:
    """Shared by the single-process and the Ray tests: the same answers from both servers."""
    auth = {"Authorization": f"Bearer {key}"}
    good = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200  # open without the key
        for path, method, body in (("/v1/models", "GET", None), ("/v1/completions", "POST", good),
                                   ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "x"}]})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                            {"Authorization": "Basic " + key}):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and "Bearer" in err["message"]
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models", headers=auth).status_code == 200
        r = c.post("/v1/completions", json=good, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

        # max_tokens that the context window can never hold: 400 naming the limit
        for name in ("max_tokens", "max_completion_tokens"):
            body = {"messages": [{"role": "user", "content": "hi"}], name: context_window}
            r = c.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert f"at most {context_window - 1}" in r.json()["error"]["message"]
        # a prompt that fills the window: 400 from the engine's admission check
        r = c.post("/v1/completions", json={**good, "prompt": [5] * context_window}, headers=auth)
        assert r.status_code == 400 and "context window" in r.json()["error"]["message"], r.text
        # bodies over the cap: 413, declared (content-length) or streamed in chunks
        big = {**good, "prompt": "a" * (max_body + 10)}
        r = c.post("/v1/completions", json=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():
            for _ in range(max_body // 1000 + 2):
                yield b" " * 1000

        r = c.post("/v1/completions", content=chunks(), headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413
        # the limits cost nothing to a good request right after
        r = c.post("/v1/completions", json={**good, "max_tokens": context_window - 8}, headers=auth)
        assert r.status_code == 200


def test_auth_and_limits_single_process(server) -> None:
    check_auth_and_limits(server.url, server.worker.engine.context_window, MAX_BODY, KEY)


def test_no_key_means_open(tiny_served_model) -> None:
    with tiny_server(tiny_served_model, 2, 2048, max_queue=4) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert c.get("/v1/models").status_code == 200
