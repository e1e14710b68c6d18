"""`vptq-mlc bench api` end to end on the tiny CPU model (engine in-process, `vptq-mlc serve` in a subprocess):
the report's structure and sanity, not speed. The structured outputs are checked with jsonschema (not the bench's
own check), the prefix-cache hits with the server's /metrics counters the report copied, and the token counts
against what the requests asked for."""

from __future__ import annotations

import json
import math

import jsonschema
from click.testing import CliRunner

from vptq_mlc.bench.cli import bench

# DECODE: long enough that a stream spans several chunks even when the client lags on a busy 2-core box (the
# server merges unread tokens; one chunk has no decode rate)
PREFIX, ITEMS, DECODE, BATCHES = 128, 16, 128, (1, 3)


def test_bench_api_on_the_tiny_model(tiny_served_model, tmp_path) -> None:
    _, model_dir, lib = tiny_served_model
    out = tmp_path / "api.json"
    r = CliRunner().invoke(bench, ["api", str(model_dir), "--lib", str(lib), "--device", "cpu", "--json", str(out),
                                   "--batches", ",".join(map(str, BATCHES)), "--decode-tokens", str(DECODE),
                                   "--prefix-tokens", str(PREFIX), "--items", str(ITEMS), "--reps", "2",
                                   "--prompt-tokens", "8"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads(out.read_text())

    st = res["server"]["structured"]
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": ITEMS, "maxItems": ITEMS}
    assert st["schema"] == schema
    for mode in ("greedy", "model_sampling"):
        m = st[mode]
        for text in m["structured_texts"]:
            jsonschema.validate(json.loads(text), schema)  # raises if the output breaks the schema
        assert m["structured_valid"] == [True, True] and m["structured_finish"] == ["stop", "stop"]
        assert m["free_tokens"] == m["structured_tokens"] and min(m["structured_tokens"]) >= 2 * ITEMS
        assert m["structured_over_free"] == m["structured_tok_s"] / m["free_tok_s"] > 0

    p = res["server"]["prefix"]
    assert len(p["reps"]) == 2
    for rep in p["reps"]:
        assert rep["first"]["hits"] == rep["control"]["hits"] == 0 and rep["second"]["hits"] == 1
        assert rep["second"]["hit_tokens"] == PREFIX and rep["first"]["hit_tokens"] == 0
        assert all(rep[k]["lookups"] == 1 and rep[k]["prompt_tokens"] == PREFIX + p["suffix_tokens"]
                   for k in ("first", "second", "control"))
    assert p["ttft_first_ms"] > 0 and p["ttft_second_ms"] > 0
    assert math.isclose(p["first_over_second"], p["ttft_first_ms"] / p["ttft_second_ms"])

    for b in map(str, BATCHES):
        for key, ratio in (("batches", "server_over_engine"),
                           ("batches_model_sampling", "server_over_engine_model_sampling")):
            eng, srv = res["engine"][key][b], res["server"][key][b]
            assert eng["tokens_per_stream"] == srv["tokens_per_stream"] == [DECODE] * int(b)
            # one CPU library, same prompts (and seeds: the counter-based draws do not depend on the batch)
            assert srv["tokens_match_engine"] is True
            assert math.isclose(res[ratio][b], srv["decode_tok_s"] / eng["decode_tok_s"])
            assert eng["decode_tok_s"] > 0 and srv["decode_tok_s"] > 0 and "token_ids" not in eng
        assert res["server"]["batches"][b]["greedy_tokens_match_engine"] is True
    assert res["weights"] == "present"
    for row in ("b1 json_schema vs free (greedy)", "first vs second", "b3 decode tok/s: server vs engine (greedy)",
                "b3 decode tok/s: server vs engine (model_sampling)"):
        assert row in r.output
