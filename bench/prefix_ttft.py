"""Where a request's time to first token goes when its prompt shares a cached prefix: engine level, no HTTP.

For `--reps` fresh prefixes of `--prefix-tokens` random ids: request A (prefix + suffix A) runs to its first token
and finishes (its KV is kept by the prefix cache); request B (prefix + suffix B) then starts from A's cached pages;
control C is the `--suffix-tokens` suffix alone (no prefix: the same new-token count without the cached context).
Each engine step of B is timed (the sampled token's download syncs the device), so B's TTFT splits into the steps it
took; B - C is what attending over the cached prefix (and the fork) costs. Compare with `vptq-mlc bench api`'s
server-side TTFT (same shapes) for the HTTP and streaming share.

    # GPU host (runtime-only TVM on PYTHONPATH, TVM_USE_RUNTIME_LIB=1); a config-only model dir gets random weights
    python3 bench/prefix_ttft.py MODEL_DIR --lib LIB --device cuda --prefix-tokens 1024 --suffix-tokens 16 --json OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def first_token(engine, prompt: list[int], max_tokens: int = 2) -> tuple[float, list[float], object]:  # noqa: ANN001
    """(seconds to the first token, each step's seconds until then, the request) for one request alone."""
    from vptq_mlc.runtime import SamplingParams

    t0 = time.perf_counter()
    req = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    steps = []
    while not req.output_ids:
        s0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - s0)
    ttft = time.perf_counter() - t0
    while not req.finished:
        engine.step()
    return ttft, steps, req


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--lib", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--suffix-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.prefix_tokens < 1 or a.suffix_tokens < 1 or a.reps < 1:
        raise SystemExit("error: --prefix-tokens, --suffix-tokens and --reps must be at least 1")

    from vptq_mlc.bench.api import TILE, random_prompt
    from vptq_mlc.bench.e2e_engine import prepare_weights
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.library import load_library

    md = load_library(a.lib, a.device).metadata
    with tempfile.TemporaryDirectory(prefix="vptq-prefix-ttft-") as tmp:
        run_dir, _ = prepare_weights(a.model_dir, md["params"], Path(tmp) / "model", TILE)
        n, m = a.prefix_tokens, a.suffix_tokens
        engine = Engine(run_dir, a.lib, device=a.device, max_batch_size=1,
                        max_total_tokens=16 * (4 + a.reps) * (n + m + 8) // 16, prefix_cache=True)
        vocab = int(engine.frontend.vocab_size)
        first_token(engine, random_prompt(1, n + m, vocab))  # warm-up: kernels of both prompt lengths
        first_token(engine, random_prompt(2, m, vocab))
        rows = []
        for rep in range(a.reps):
            prefix = random_prompt(100 + rep, n, vocab)
            ta, sa, _ = first_token(engine, prefix + random_prompt(200 + rep, m, vocab))
            tb, sb, req_b = first_token(engine, prefix + random_prompt(300 + rep, m, vocab))
            tc, sc, _ = first_token(engine, random_prompt(400 + rep, m, vocab))
            rows.append({"a_ms": 1e3 * ta, "a_steps_ms": [1e3 * s for s in sa], "b_ms": 1e3 * tb,
                         "b_steps_ms": [1e3 * s for s in sb], "b_tokens": list(req_b.output_ids),
                         "c_ms": 1e3 * tc, "c_steps_ms": [1e3 * s for s in sc]})
        med = {k: statistics.median(r[k] for r in rows) for k in ("a_ms", "b_ms", "c_ms")}
        res = {"prefix_tokens": n, "suffix_tokens": m, "device": a.device, "lib": a.lib, "median": med,
               "a_over_b": med["a_ms"] / med["b_ms"], "reps": rows,
               "prefix_cache": {"hits": engine.prefix_cache.hits, "hit_tokens": engine.prefix_cache.hit_tokens}}
    print(json.dumps({k: v for k, v in res.items() if k != "reps"}, indent=1))
    for r in rows:
        print("steps ms: A", [round(x, 1) for x in r["a_steps_ms"]], "B", [round(x, 1) for x in r["b_steps_ms"]],
              "C", [round(x, 1) for x in r["c_steps_ms"]])
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    from vptq_mlc.errors import VPTQMLCError

    try:
        main()
    except (VPTQMLCError, OSError) as e:  # a bad model dir, library or device: one line, as the CLI does
        raise SystemExit(f"error: {e}") from None
