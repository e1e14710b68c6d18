"""bench/serve_load.py's long-prompt scenario against an in-process server on the tiny model: the streams keep
getting tokens while the long prompt is prefilled when steps mix decode and prefill, and the report's gap split
agrees with the stamps it was computed from; and the stream checks the load client and `bench api` share."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vptq_mlc.runtime import Engine
from vptq_mlc.serve.server import ServerThread

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("budget", [16, 0])
def test_long_prompt_scenario(tiny_served_model, budget: int) -> None:
    bench = load_bench()
    _, model_dir, lib = tiny_served_model
    engine = Engine(model_dir, lib, device="cpu", max_batch_size=4, max_total_tokens=2048, step_token_budget=budget)
    with ServerThread(engine, max_queue=8) as s:
        # streams long enough to outlast the prompt's prefill however fast this box decodes, and short enough that
        # the KV cache (2048 tokens) holds them and the prompt together: 3 x (400 + prompt) + 320
        r = asyncio.run(bench.long_prompt_scenario(s.url, None, 3, 400, 320, 0.05, "greedy"))
    assert r["streams_failed"] == 0 and r["streams_running_at_first_token"] == 3
    assert r["long_prefill_ms"] > 0 and r["gaps_before"] > 0
    if budget:  # 320 prompt tokens at 16 - 3 a step: ~25 steps, a token for every stream in each
        assert r["gaps_during"] >= 3 * 5
    assert r["itl_during_max_ms"] >= r["itl_during_p99_ms"] >= r["itl_during_p50_ms"]


class _Lines:
    """A streamed HTTP response of fixed lines, behind `client.stream(...)` as httpx.AsyncClient has it."""

    status_code = 200

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def stream(self, *args: object, **kwargs: object) -> contextlib.AbstractAsyncContextManager:
        @contextlib.asynccontextmanager
        async def response():  # noqa: ANN202
            yield self

        return response()

    async def aiter_lines(self):  # noqa: ANN201
        for line in self.lines:
            yield line


def _chunk(ids: list[int], finish: str | None = None) -> str:
    return "data: " + json.dumps({"choices": [{"text": "x", "token_ids": ids, "finish_reason": finish}]})


GOOD = [_chunk([1, 2]), "", _chunk([3], "length"), "", 'data: {"choices": [], "usage": {"completion_tokens": 3}}',
        "", "data: [DONE]", ""]


@pytest.mark.parametrize("lines, error", [
    (GOOD, ""),
    ([_chunk([1]), "event: x"], "malformed: unexpected line 'event: x'"),
    (GOOD + ["data: {}"], "malformed: unexpected line 'data: {}'"),
    ([_chunk([1]), 'data: {"error": {"message": "boom"}}'], "stream error: boom"),
    (GOOD[:-2], "malformed: done=False finish_reasons=1 usage={'completion_tokens': 3} tokens=3"),
])
def test_every_stream_is_checked(lines: list[str], error: str) -> None:
    """Framing, error events, [DONE] and the usage count, by the load client and by `bench api`'s stream reader."""
    from vptq_mlc.bench.api import stream_request

    r = asyncio.run(load_bench().one_request(_Lines(lines), None, 0, 3))
    assert (r.ok, r.error) == (not error, error)
    if error:
        with pytest.raises(RuntimeError, match="^/v1/completions: "):
            asyncio.run(stream_request(_Lines(lines), "/v1/completions", {}))
    else:
        assert asyncio.run(stream_request(_Lines(lines), "/v1/completions", {})).token_ids == [1, 2, 3]
