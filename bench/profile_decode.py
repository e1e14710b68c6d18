"""Where one decode step's GPU time goes: kernel times of our model library (torch's CUPTI profiler sees every
kernel of the process, TVM's included, also those replayed from CUDA graphs).

GPU host, runtime-only TVM + torch: python3 bench/profile_decode.py MODEL_DIR LIB OUT.json [--batch 1] [--steps 8]
[--sampling greedy|model|T,P] [--prefill N]
With --prefill N: the kernels of one N-token prefill (the library's prefill chunks) instead of decode steps.
MODEL_DIR may be config-only (random weights are written as `vptq-mlc bench e2e` does). Prints the kernels by total
time per decode step and writes them to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("lib")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sampling", default="greedy", help="greedy | model (the model's defaults) | T,P")
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    a = ap.parse_args()

    from vptq_mlc.bench.e2e_common import Grid
    from vptq_mlc.bench.e2e_engine import PAGE, decode_tok_s, prepare_weights, profile_decode_steps, profile_prefill
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.library import load_library

    md = load_library(a.lib, "cuda").metadata
    work = tempfile.mkdtemp(prefix="vptq-prof-")
    run_dir, _ = prepare_weights(Path(a.model_dir), md["params"], Path(work), tile=1 << 20)
    tokens = max(a.context + 64, a.prefill + 1)
    engine = Engine(run_dir, a.lib, device="cuda", max_batch_size=a.batch,
                    max_total_tokens=a.batch * (-(-tokens // PAGE) * PAGE), page_size=PAGE)
    if a.prefill:
        plain, wall, per = profile_prefill(engine, a.prefill)
        rows = sorted(({"kernel": k, "us": v[0], "calls": v[1]} for k, v in per.items()), key=lambda r: -r["us"])
        total = sum(r["us"] for r in rows)
        print(f"prefill {a.prefill} tokens: wall {plain * 1e3:.2f} ms ({wall * 1e3:.2f} profiled), kernels "
              f"{total / 1e3:.2f} ms, {sum(r['calls'] for r in rows)} launches")
        for r in rows[:40]:
            print(f"{r['us']:10.1f} us {r['calls']:5d}x  {r['kernel'][:110]}")
        Path(a.out).write_text(json.dumps({"prefill_tokens": a.prefill, "wall_us": plain * 1e6,
                                           "wall_profiled_us": wall * 1e6, "kernel_us": total, "rows": rows},
                                          indent=1))
        return
    grid = Grid(batches=(a.batch,), contexts=(a.context,), prefill=(), steps=2, warmup=2, prefill_reps=1,
                sampling=a.sampling)
    decode_tok_s(engine, a.batch, a.context, grid)  # warm-up: kernels loaded, CUDA graphs captured
    plain, wall, per = profile_decode_steps(engine, a.batch, a.context, grid, a.steps, 2 * a.steps + 4,
                                            unprofiled_steps=a.steps)
    rows = sorted(({"kernel": k, "us_per_step": v[0] / a.steps, "calls_per_step": v[1] / a.steps}
                   for k, v in per.items()), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"decode batch {a.batch} ctx {a.context} sampling {a.sampling}: step wall {plain * 1e6:.0f} us "
          f"({wall * 1e6:.0f} profiled), "
          f"kernels {total:.0f} us per step, {sum(r['calls_per_step'] for r in rows):.0f} launches per step")
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel'][:110]}")
    Path(a.out).write_text(json.dumps({"step_wall_us": plain * 1e6, "step_wall_profiled_us": wall * 1e6,
                                       "kernel_us_per_step": total, "rows": rows},
                                      indent=1))


if __name__ == "__main__":
    main()
