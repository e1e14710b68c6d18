"""Prefix caching: a later request that shares a prompt prefix with a finished one forks its KV pages instead of
prefilling them again, and generates exactly what an engine without the cache generates."""

from __future__ import annotations

import httpx
import pytest

from vptq_mlc.runtime import Engine
from vptq_mlc.serve.server import ServerThread

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, in plain English, and never repeat yourself. " * 2


def greedy(engine: Engine, prompt: list[int], n: int = 8) -> tuple[list[int], int]:
    """(greedy ids, prompt tokens the engine prefilled for this request)."""
    before = engine.prefill_tokens
    req = engine.add_request(prompt, engine.frontend.sampling_params(max_tokens=n, temperature=0, ignore_eos=True))
    while not req.finished:
        engine.step()
    return req.output_ids, engine.prefill_tokens - before


@pytest.fixture(scope="module")
def engines(tiny_served_model):
    _, model_dir, lib = tiny_served_model
    cached = Engine(model_dir, lib, device="cpu", max_batch_size=4, max_total_tokens=2048, prefix_cache=True)
    plain = Engine(model_dir, lib, device="cpu", max_batch_size=4, max_total_tokens=2048)
    return cached, plain


def test_shared_prefix_is_not_prefilled_again(engines) -> None:
    cached, plain = engines
    tok = cached.tokenizer
    first = tok.encode(SYSTEM + "What is the capital of France?")
    second = tok.encode(SYSTEM + "Name three colours of the rainbow.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 32, "the prompts must share at least two KV pages"

    out1, run1 = greedy(cached, first)
    assert run1 == len(first) and out1 == greedy(plain, first)[0]
    out2, run2 = greedy(cached, second)
    assert run2 == len(second) - shared  # only the new suffix went through the model
    assert out2 == greedy(plain, second)[0]

    # a follow-up that contains the whole earlier exchange reuses its generated tokens too
    follow = second + out2 + tok.encode(" And the capital of Spain?")
    out3, run3 = greedy(cached, follow)
    assert run3 == len(follow) - (len(second) + len(out2) - 1)  # the last generated token was never fed
    assert out3 == greedy(plain, follow)[0]
    assert cached.prefix_cache.hits == 2


def test_n_sequences_share_one_prefill(engines) -> None:
    """Requests queued together with one prompt (n choices): the first prefills it, the others fork it."""
    cached, plain = engines
    prompt = cached.tokenizer.encode("Three friends walked into the old library on a rainy afternoon and")
    assert len(prompt) >= 2 * cached.kv.page_size
    before = cached.prefill_tokens
    params = cached.frontend.sampling_params(max_tokens=6, temperature=0, ignore_eos=True)
    reqs = [cached.add_request(prompt, params) for _ in range(3)]
    while not all(r.finished for r in reqs):
        cached.step()
    assert cached.prefill_tokens - before == len(prompt) + 2  # two forks run only the last prompt token
    expected = greedy(plain, prompt, 6)[0]
    assert all(r.output_ids == expected for r in reqs)


def test_cached_prefixes_give_their_pages_back(engines) -> None:
    cached, plain = engines
    tok = cached.tokenizer
    for i in range(6):  # distinct long prompts fill the cache
        greedy(cached, tok.encode(f"{i} " + SYSTEM * 2), n=2)
    assert cached.prefix_cache.pages > 0
    # a request that needs nearly every page is admitted: cached prefixes are evicted for it
    big = tok.encode("story " * 20)
    budget = cached.kv.total_pages * cached.kv.page_size - len(big) - cached.kv.page_size
    params = cached.frontend.sampling_params(max_tokens=budget, temperature=0, ignore_eos=True)
    req = cached.add_request(big, params)
    cached.step()
    assert req.seq_id is not None and cached.prefix_cache.pages + req.reserved_pages <= cached.kv.total_pages
    cached.cancel(req)
    out, _ = greedy(cached, tok.encode("Once upon a time"))
    assert out == greedy(plain, tok.encode("Once upon a time"))[0]


def test_server_reports_prefix_hits(tiny_served_model) -> None:
    _, model_dir, lib = tiny_served_model
    engine = Engine(model_dir, lib, device="cpu", max_batch_size=4, max_total_tokens=2048, prefix_cache=True)
    body = {"temperature": 0, "max_tokens": 4, "ignore_eos": True, "return_token_ids": True}
    with ServerThread(engine, max_queue=4) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        a = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "system", "content": SYSTEM},
                                                                      {"role": "user", "content": "Hi"}]})
        b = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "system", "content": SYSTEM},
                                                                      {"role": "user", "content": "Bye"}]})
        assert a.status_code == b.status_code == 200
        text = c.get("/metrics").text
    metrics = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(metrics["vptq_mlc_prefix_cache_hits_total"]) == 1
    assert float(metrics["vptq_mlc_prefix_cache_hit_tokens_total"]) >= 32
    assert float(metrics["vptq_mlc_prompt_tokens_prefilled_total"]) == \
        a.json()["usage"]["prompt_tokens"] + b.json()["usage"]["prompt_tokens"] - \
        float(metrics["vptq_mlc_prefix_cache_hit_tokens_total"])
