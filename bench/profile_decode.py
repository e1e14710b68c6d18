"""Where one decode step's GPU time goes: kernel times of our model library (torch's CUPTI profiler sees every
kernel of the process, TVM's included, also those replayed from CUDA graphs).

GPU host, runtime-only TVM + torch: python3 bench/profile_decode.py MODEL_DIR LIB OUT.json [--batch 1] [--steps 8]
[--sampling greedy|model|T,P] [--prefill N]
With --prefill N: the kernels of one N-token prefill (the library's prefill chunks) instead of decode steps.
With --host-time: no profiler; how long the model function's call takes on the host (until it returns, the GPU
still running) against the whole step (synchronized), per decode step or prefill: a host call as long as the step
means the host, not the GPU, sets the pace (a synchronization inside the call, or launches slower than the kernels).
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
    ap.add_argument("--host-time", action="store_true", help="host time of the model call vs the step (no profiler)")
    ap.add_argument("--no-overlap", action="store_true", help="read each step's tokens before queueing the next")
    a = ap.parse_args()

    from vptq_mlc.bench.e2e_common import Grid, decode_prompt_len
    from vptq_mlc.bench.e2e_engine import (
        PAGE,
        decode_budget,
        decode_tok_s,
        prepare_weights,
        profile_decode_steps,
        profile_prefill,
    )
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.library import load_library

    md = load_library(a.lib, "cuda").metadata
    work = tempfile.mkdtemp(prefix="vptq-prof-")
    run_dir, _ = prepare_weights(Path(a.model_dir), md["params"], Path(work), tile=1 << 20)
    grid = Grid(batches=(a.batch,), contexts=(a.context,), prefill=(), steps=2, warmup=2, prefill_reps=1,
                sampling=a.sampling)  # the decode warm-up's
    # a request's KV: its context plus the warm-up's new-token budget (decode_tok_s), or the profiled steps'
    plen = decode_prompt_len(a.context, grid)
    tokens = max(plen + decode_budget(grid, a.batch, plen), a.context + 2 * a.steps + 8, a.prefill + 1)
    engine = Engine(run_dir, a.lib, device="cuda", max_batch_size=a.batch,
                    max_total_tokens=a.batch * (-(-tokens // PAGE) * PAGE), page_size=PAGE,
                    overlap=False if a.no_overlap else None)
    if a.host_time:
        host_time(engine, a)
        return
    if a.prefill:
        plain, wall, per, gaps = profile_prefill(engine, a.prefill)
        rows = sorted(({"kernel": k, "us": v[0], "calls": v[1]} for k, v in per.items()), key=lambda r: -r["us"])
        total = sum(r["us"] for r in rows)
        print(f"prefill {a.prefill} tokens: wall {plain * 1e3:.2f} ms ({wall * 1e3:.2f} profiled), kernels "
              f"{total / 1e3:.2f} ms, {sum(r['calls'] for r in rows)} launches")
        for r in rows[:40]:
            print(f"{r['us']:10.1f} us {r['calls']:5d}x  {r['kernel'][:110]}")
        print_gaps(gaps)
        Path(a.out).write_text(json.dumps({"prefill_tokens": a.prefill, "wall_us": plain * 1e6,
                                           "wall_profiled_us": wall * 1e6, "kernel_us": total, "rows": rows,
                                           "timeline": gaps}, indent=1))
        return
    decode_tok_s(engine, a.batch, a.context, grid)  # warm-up: kernels loaded, CUDA graphs captured
    plain, wall, per, gaps = profile_decode_steps(engine, a.batch, a.context, grid, a.steps, 2 * a.steps + 4,
                                            unprofiled_steps=a.steps)
    rows = sorted(({"kernel": k, "us_per_step": v[0] / a.steps, "calls_per_step": v[1] / a.steps}
                   for k, v in per.items()), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"decode batch {a.batch} ctx {a.context} sampling {a.sampling}: step wall {plain * 1e6:.0f} us "
          f"({wall * 1e6:.0f} profiled), "
          f"kernels {total:.0f} us per step, {sum(r['calls_per_step'] for r in rows):.0f} launches per step")
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel'][:110]}")
    print_gaps(gaps)
    Path(a.out).write_text(json.dumps({"step_wall_us": plain * 1e6, "step_wall_profiled_us": wall * 1e6,
                                       "kernel_us_per_step": total, "rows": rows, "timeline": gaps},
                                      indent=1))


def print_gaps(gaps: dict) -> None:
    """The GPU's idle time in the profiled span, where it falls, and the host's CUDA API calls."""
    print(f"GPU idle {gaps['idle_us']:.0f} us of a {gaps['span_us']:.0f} us span; largest idle stretches:")
    for g in gaps["gaps"]:
        print(f"{g['us']:10.1f} us {g['count']:5d}x  {g['before']} -> {g['after']}")
    for c in gaps["host_api"]:
        print(f"{c['us']:10.1f} us {c['count']:5d}x  host {c['call']}")


def host_time(engine, a) -> None:
    """Per model call: seconds until the call returns on the host, and until the GPU is done with the step."""
    import time

    import torch

    from vptq_mlc.bench.e2e_common import Grid
    from vptq_mlc.bench.e2e_engine import decode_tok_s, prefill_tok_s

    calls: dict[str, list[float]] = {"prefill": [], "decode": []}

    def timed(fn, kind):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            calls[kind].append(time.perf_counter() - t0)
            return out
        return call

    # a benchmark's probe of the engine's model calls
    engine._prefill = timed(engine._prefill, "prefill")  # noqa: SLF001
    engine._static_decode = {n: timed(f, "decode") for n, f in engine._static_decode.items()}  # noqa: SLF001
    engine._decode = timed(engine._decode, "decode")  # noqa: SLF001
    out: dict = {}
    if a.prefill:
        prefill_tok_s(engine, a.prefill, reps=1)  # warm-up
        for _ in range(3):
            calls["prefill"].clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill_tok_s(engine, a.prefill, reps=1)
            torch.cuda.synchronize()
            step = time.perf_counter() - t0
            host = sum(calls["prefill"])
            out.setdefault("prefill", []).append({"host_call_s": host, "calls": len(calls["prefill"]), "step_s": step})
            print(f"prefill {a.prefill}: host time in {len(calls['prefill'])} model call(s) {host * 1e3:.2f} ms, "
                  f"whole prefill (synchronized) {step * 1e3:.2f} ms")
    else:
        grid = Grid(batches=(a.batch,), contexts=(a.context,), prefill=(), steps=a.steps, warmup=2, prefill_reps=1,
                    sampling=a.sampling)
        # the step's other host phases: the embedding call, the KV cache's begin/end_forward, the sampler (step by
        # step: its launch, the tokens' copy down, which waits for the GPU, and the requests' bookkeeping;
        # overlapped: "queue_sample" its launch and the queued copy, "read" the wait for the tokens + bookkeeping)
        phases = [("embed", engine, "_embed_tensor"), ("begin_forward", engine.kv, "_begin"),
                  ("end_forward", engine.kv, "_end"), ("sample", engine, "_sample"), ("read", engine, "_take_picks")]
        if engine.device_sampler is not None:
            phases.append(("queue_sample", engine.device_sampler, "sample_later"))
        for kind, owner, name in phases:
            calls[kind] = []
            setattr(owner, name, timed(getattr(owner, name), kind))
        decode_tok_s(engine, a.batch, a.context, grid)  # warm-up: CUDA graphs captured
        for v in calls.values():
            v.clear()
        r = decode_tok_s(engine, a.batch, a.context, grid)
        n = len(calls["decode"])
        per = {k: sum(v) / max(1, n) for k, v in calls.items() if k != "prefill"}
        step = a.batch / r["tok_s"]
        out["decode"] = {"host_call_s_per_step": per["decode"], "phases_s_per_step": per, "step_s": step, "result": r}
        print(f"decode batch {a.batch} ctx {a.context}: host time in the decode call {per['decode'] * 1e6:.0f} us per "
              f"step, step {step * 1e6:.0f} us ({r['tok_s']:.1f} tok/s); per step: "
              + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in per.items()))
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
