"""Decode tok/s at the model's default sampling against greedy, on ONE engine (same random weights, same process),
the two modes interleaved round by round so drift between them cancels; optionally the GPU kernels of a step in
each mode (torch's profiler: the sampler's own kernels apart from the model's).

`bench e2e --sampling greedy` and `--sampling model` run as two processes, each writing its own random weights
(~40 s for an 8B shape); this writes them once and alternates greedy / model at each batch:

    python3 bench/sampling_vs_greedy.py MODEL_DIR LIB OUT.json [--batches 1,16] [--rounds 3] [--profile]

MODEL_DIR may be config-only (random weights as `vptq-mlc bench e2e` writes them). Per batch: the median over the
rounds of each mode's tok/s (each itself `bench e2e`'s median of 4 windows), the ratio model / greedy, and the
extra milliseconds a sampled step costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

MODES = ("greedy", "model")


def kernel_profile(engine: Any, batch: int, context: int, grid: Any, steps: int) -> dict[str, Any]:
    """GPU kernel time per decode step (torch's CUPTI profiler sees TVM's kernels), the sampler's apart."""
    from vptq_mlc.bench.e2e_engine import _drain, profile_decode_steps

    _, wall, per, _ = profile_decode_steps(engine, batch, context, grid, steps, steps + batch + 4)
    _drain(engine)
    sampler = {k: v for k, v in per.items() if k.startswith("sample_tokens")}
    return {"step_wall_profiled_us": wall * 1e6,
            "kernel_us_per_step": sum(v[0] for v in per.values()) / steps,
            "launches_per_step": sum(v[1] for v in per.values()) / steps,
            "sampler_kernel_us_per_step": sum(v[0] for v in sampler.values()) / steps,
            "sampler_launches_per_step": sum(v[1] for v in sampler.values()) / steps,
            "sampler_kernels": {k: {"us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                                for k, v in sorted(sampler.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("lib")
    ap.add_argument("out")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also the kernels of a step in each mode (needs torch)")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from vptq_mlc.bench.e2e_common import Grid, decode_prompt_len
    from vptq_mlc.bench.e2e_engine import PAGE, decode_budget, decode_tok_s, prepare_weights
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.library import load_library

    batches = [int(b) for b in a.batches.split(",")]
    grids = {m: Grid(batches=tuple(batches), contexts=(a.context,), prefill=(), steps=a.steps, warmup=2,
                     prefill_reps=1, sampling=m) for m in MODES}
    md = load_library(a.lib, a.device).metadata
    with tempfile.TemporaryDirectory(prefix="vptq-sampling-") as work:
        run_dir, info = prepare_weights(Path(a.model_dir), md["params"], Path(work), tile=1 << 20)
        plen = decode_prompt_len(a.context, grids["greedy"])
        held = plen + decode_budget(grids["greedy"], max(batches), plen)
        kv_tokens = max(batches) * (-(-max(held, a.steps + max(batches) + 4 + a.context) // PAGE) * PAGE)
        engine = Engine(run_dir, a.lib, device=a.device, max_batch_size=max(batches), max_total_tokens=kv_tokens,
                        page_size=PAGE)
        sample = engine.frontend.sampling_params(max_tokens=1)
        result: dict[str, Any] = {
            "lib": a.lib, "weights": info, "context": a.context, "steps": a.steps, "rounds": a.rounds,
            "model_sampling": {"temperature": sample.temperature, "top_p": sample.top_p, "top_k": sample.top_k,
                               "on_device": engine.device_sampler is not None},
            "batches": {}}
        for b in batches:
            runs: dict[str, list[float]] = {m: [] for m in MODES}
            decode_tok_s(engine, b, a.context, grids["greedy"])  # warm-up: kernels loaded, CUDA graphs captured
            for r in range(a.rounds):
                for m in (MODES if r % 2 == 0 else MODES[::-1]):
                    runs[m].append(decode_tok_s(engine, b, a.context, grids[m])["tok_s"])
            med = {m: statistics.median(v) for m, v in runs.items()}
            row = {"tok_s": runs, "median_tok_s": med, "model_over_greedy": med["model"] / med["greedy"],
                   "extra_ms_per_sampled_step": 1e3 * b * (1 / med["model"] - 1 / med["greedy"])}
            result["batches"][str(b)] = row
            logging.info("batch %d: greedy %.1f, model %.1f tok/s (%.3fx; +%.3f ms per step)", b, med["greedy"],
                         med["model"], row["model_over_greedy"], row["extra_ms_per_sampled_step"])
            Path(a.out).write_text(json.dumps(result, indent=1))  # each batch as soon as it is measured
        for b in batches if a.profile else ():
            row = result["batches"][str(b)]
            row["profile"] = {m: kernel_profile(engine, b, a.context, grids[m], 16) for m in MODES}
            for m in MODES:
                logging.info("batch %d %s: sampler kernels %.1f us in %.0f launches per step (all kernels %.1f us)", b,
                             m, row["profile"][m]["sampler_kernel_us_per_step"],
                             row["profile"][m]["sampler_launches_per_step"], row["profile"][m]["kernel_us_per_step"])
            Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
