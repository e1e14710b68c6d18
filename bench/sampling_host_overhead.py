"""Host time of the sampling stage of a decode step, greedy vs the model's default sampling, on a CPU library.

A decode step's sampling stage (`Engine._sample`) runs on the host around one library call (`sample_tokens`): each
row's parameters, uniform and penalty lists, packing, uploads, the call, reading the tokens back, then appending each
token (detokenizer, stop strings). On a GPU only the call is device work, and the host part is not hidden behind it:
the next step starts after it. This measures that host part without a GPU: the stage's wall time minus the time
inside the library's sampler, per decode step (median over the timed steps), at each batch size, for greedy rows and
for the model's default sampling (temperature 0.6, top_p 0.9, seeded: Llama 3.1's generation_config).

The model is a tiny synthetic Llama with the Llama-3.1 vocabulary (128256 tokens: a trained byte-level BPE of ~1,500
entries filled with reserved special tokens, as bench e2e's 8B shape has), built once into --work (~10 s):

    python3 bench/sampling_host_overhead.py --work /tmp/vptq-host-overhead --batches 1,16 --json OUT.json

Columns: `host us/step` (the stage minus the sampler call), of which `sampler host` (DeviceSampler.sample minus the
call: packing, uploads, read-back) and `append` (Request.append: detokenizer, stop strings); `uploads/step`: the
sampler's host-to-device copies per step (where the runtime counts them); `call ms`: the library's sampler (CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VOCAB = 128256
MODEL_SAMPLING = {"temperature": 0.6, "top_p": 0.9}  # Llama-3.1-Instruct's generation_config.json


def build_model(work: Path) -> Path:
    """The tiny synthetic model dir with its llvm library in it (built once; reused when present)."""
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    model_dir = work / "mlc"
    if model_dir.is_dir() and any(model_dir.glob("*.so")):
        return model_dir
    ckpt = make_synthetic_checkpoint(work / "ckpt", arch="llama", variant="v8-k256-0", dtype="float32", seed=3,
                                     vocab_size=VOCAB, hidden_size=64, num_layers=1, overwrite=True)
    convert_checkpoint(ckpt, model_dir, context_window_size=256, prefill_chunk_size=64, max_batch_size=16)
    compile_model(model_dir, "llvm")
    return model_dir


class StepClock:
    """Per-call timers patched around the engine's sampling stage, the library's sampler and Request.append."""

    def __init__(self, engine: Any) -> None:
        from vptq_mlc.runtime.request import Request

        self.engine, self.request_cls = engine, Request
        self.stage: list[float] = []  # per _sample call: wall, sampler call, DeviceSampler.sample, appends
        self.call = self.sampler = self.append = 0.0
        self._saved = (engine._sample, engine.device_sampler.func, engine.device_sampler.sample, Request.append)
        engine._sample = self._timed(engine._sample, "stage")
        engine.device_sampler.func = self._timed(engine.device_sampler.func, "call")
        engine.device_sampler.sample = self._timed(engine.device_sampler.sample, "sampler")
        Request.append = self._timed(Request.append, "append")
        self.rows: list[tuple[float, float, float, float]] = []

    def _timed(self, fn: Callable, what: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if what == "stage":
                self.call = self.sampler = self.append = 0.0
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if what == "stage":
                    self.rows.append((dt, self.call, self.sampler, self.append))
                else:
                    setattr(self, what, getattr(self, what) + dt)
        return run

    def restore(self) -> None:
        self.engine._sample, self.engine.device_sampler.func, self.engine.device_sampler.sample, \
            self.request_cls.append = self._saved


def measure(engine: Any, batch: int, mode: str, steps: int, warmup: int, prompt_tokens: int) -> dict[str, Any]:
    """`batch` requests decoding together: the timed steps' sampling-stage host time (module docstring)."""
    import numpy as np

    from vptq_mlc.runtime.sampling import SamplingParams

    def params(i: int) -> SamplingParams:
        extra = {"temperature": 0.0} if mode == "greedy" else {**MODEL_SAMPLING, "seed": i}
        return SamplingParams(max_tokens=warmup + steps + batch + 2, ignore_eos=True, **extra)

    reqs = [engine.add_request([int(t) for t in np.random.default_rng(i).integers(1, 1000, prompt_tokens)],
                               params(i)) for i in range(batch)]
    while not all(r.prefill_done for r in reqs):
        engine.step()
    for _ in range(warmup):
        engine.step()
    clock = StepClock(engine)
    uploads0 = getattr(engine.device_sampler, "uploads", None)
    try:
        for _ in range(steps):
            engine.step()
    finally:
        clock.restore()
        for r in reqs:
            engine.cancel(r)
    uploads1 = getattr(engine.device_sampler, "uploads", None)
    host = [1e6 * (wall - call) for wall, call, _, _ in clock.rows]
    return {"batch": batch, "sampling": mode, "steps": len(clock.rows),
            "host_us_per_step": statistics.median(host), "host_us_mean": statistics.fmean(host),
            "sampler_host_us": statistics.median(1e6 * (s - c) for _, c, s, _ in clock.rows),
            "append_us": statistics.median(1e6 * a for *_, a in clock.rows),
            "call_ms": statistics.median(1e3 * c for _, c, _, _ in clock.rows),
            "uploads_per_step": None if uploads0 is None else (uploads1 - uploads0) / len(clock.rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vptq-host-overhead"),
                    help="where the tiny model is built (reused when present)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps per measurement")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per setting, interleaved (median)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from vptq_mlc.runtime.engine import Engine

    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(build_model(args.work), device="cpu", max_batch_size=max(batches))
    if engine.device_sampler is None:
        print("error: the library has no sample_tokens (rebuild it: delete --work)", file=sys.stderr)
        return 1
    results = []
    for b in batches:
        runs: dict[str, list[dict[str, Any]]] = {"greedy": [], "model": []}
        for _ in range(args.repeats):  # interleaved, so load on the box moves both alike
            for mode in runs:
                runs[mode].append(measure(engine, b, mode, args.steps, args.warmup, args.prompt_tokens))
        for rs in runs.values():
            best = sorted(rs, key=lambda r: r["host_us_per_step"])[len(rs) // 2]
            best["host_us_per_step_repeats"] = [round(r["host_us_per_step"], 1) for r in rs]
            results.append(best)
    print("| batch | sampling | host us/step | sampler host us | append us | uploads/step | call ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        up = "n/a" if r["uploads_per_step"] is None else f"{r['uploads_per_step']:.1f}"
        print(f"| {r['batch']} | {r['sampling']} | {r['host_us_per_step']:.0f} | {r['sampler_host_us']:.0f} | "
              f"{r['append_us']:.0f} | {up} | {r['call_ms']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"vocab": VOCAB, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
