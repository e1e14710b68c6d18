"""bench/serve_load.py's long-prompt scenario against an in-process server on the tiny model: the streams keep
getting tokens while the long prompt is prefilled when steps mix decode and prefill, and the report's gap split
agrees with the stamps it was computed from."""

from __future__ import annotations

import asyncio
import importlib.util
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
        r = asyncio.run(bench.long_prompt_scenario(s.url, None, 3, 160, 320, 0.05, "greedy"))
    assert r["streams_failed"] == 0 and r["streams_running_at_first_token"] == 3
    assert r["long_prefill_ms"] > 0 and r["gaps_before"] > 0
    if budget:  # 320 prompt tokens at 16 - 3 a step: ~25 steps, a token for every stream in each
        assert r["gaps_during"] >= 3 * 5
    assert r["itl_during_max_ms"] >= r["itl_during_p99_ms"] >= r["itl_during_p50_ms"]
