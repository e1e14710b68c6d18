"""Decode and prefill throughput of one of our model libraries through `Engine` (one `vptq-mlc bench e2e` system).

Runs on a runtime-only host (tvm.runtime + numpy; no compiler, no torch). Every timed region ends on the step's
tokens read back to the host (sampled on the device by the library's `sample_tokens`, or from logits copied to the
host for older libraries), so GPU work is synchronised before the clock stops. Decode samples as `--sampling` says
(greedy, the model's defaults, or a temperature/top_p pair); prefill always takes the greedy first token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from vptq_mlc.artifact.files import TENSOR_CACHE
from vptq_mlc.bench.e2e_common import Grid, Recorder, decode_prompt_len, parse_sampling, prompt_ids

log = logging.getLogger(__name__)
PAGE = 16  # KV page size the engine is built with


def write_weights(model_dir: Path, params: list[dict[str, Any]], tile: int) -> int:
    """`write_random_weights`, except that (tile > 0) a float tensor larger than `tile` elements repeats one random
    block of `tile` values: numpy draws ~0.5 GB/s on one core, ~30 s of a device call for a dense fp16 7B model,
    and float values do not change the work any kernel does. Codes and perms are drawn whole (gather locality)."""
    from vptq_mlc.bench import random_weights as rw

    if not tile:
        return rw.write_random_weights(model_dir, params)
    from tqdm import tqdm

    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.artifact.tensor_cache import TensorCacheWriter

    chat = ChatConfig.load(model_dir)
    layers = chat.vptq_layers()
    rng = np.random.default_rng(0)
    draw = rw.RandomTensors(layers, rng, chat.model_dtype)
    meta = {"random": True, "tile": tile, "tiled_tensors": 0}
    with TensorCacheWriter(model_dir, metadata=meta) as w:
        for p in tqdm(params, desc="random weights", unit="tensor"):
            kind, shape = rw.random_kind(p["name"], layers), [int(d) for d in p["shape"]]
            if kind[0] == "normal" and int(np.prod(shape)) > tile:
                a = np.resize(rw.random_array(kind, [tile], p["dtype"], rng), shape)
                w.metadata["tiled_tensors"] += 1
            else:
                a = draw.tensor(p["name"], shape, p["dtype"])
            w.add(p["name"], a)
    return w.total_bytes


def prepare_weights(model_dir: Path, params: list[dict[str, Any]], work_dir: Path, tile: int) -> tuple[Path, dict]:
    """The model dir to run: `model_dir` itself when it has weights, else a copy of its config files in
    `work_dir` filled with random weights for `params` (the library's declared parameters)."""
    if (model_dir / TENSOR_CACHE).exists():
        meta = json.loads((model_dir / TENSOR_CACHE).read_text()).get("metadata", {})
        return model_dir, {"weights": "present", "weight_bytes": meta.get("ParamBytes")}
    shutil.copytree(model_dir, work_dir, dirs_exist_ok=True)
    t0 = time.perf_counter()
    nbytes = write_weights(work_dir, params, tile)
    meta = json.loads((work_dir / TENSOR_CACHE).read_text())["metadata"]
    tiled = meta.get("tiled_tensors", 0)
    how = f" ({tiled} float tensors repeat a block of {meta['tile']} values)" if tiled else ""
    info = {"weights": "random" + how,
            "weight_bytes": nbytes, "random_weights_s": round(time.perf_counter() - t0, 1)}
    log.info("%s: %.2f GB of random weights in %.0f s", model_dir.name, nbytes / 1e9, info["random_weights_s"])
    return work_dir, info


def _drain(engine: Any) -> None:
    while engine.has_unfinished():
        engine.step()


def decode_params(engine: Any, sampling: str, max_tokens: int, seed: int) -> Any:
    """Each decode request's SamplingParams for `--sampling` (EOS ignored: every request decodes every step)."""
    from vptq_mlc.runtime.sampling import SamplingParams

    mode = parse_sampling(sampling)
    if mode == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if mode == "model":  # the model's defaults (temperature, top_p, penalties) from mlc-chat-config.json
        return engine.frontend.sampling_params(max_tokens=max_tokens, seed=seed, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=mode[0], top_p=mode[1], seed=seed, ignore_eos=True)


def decode_budget(grid: Grid, batch: int, prompt_len: int, step_tokens: int | None = None) -> int:
    """New tokens each decode request of a `batch` may make: the first token, the warm-up and timed steps, plus
    headroom for the steps in which later prompts still prefill: the engine already decodes the earlier requests
    in them (chunked prefill, `step_tokens` tokens a step), so those run ahead by up to one token per such step and
    must not finish inside the timed window (None: the engine's default budget). A request then holds its context
    plus that headroom in KV slots."""
    from vptq_mlc.runtime.engine import DEFAULT_STEP_TOKEN_BUDGET

    step_tokens = DEFAULT_STEP_TOKEN_BUDGET if step_tokens is None else step_tokens
    return 1 + grid.warmup + grid.steps + batch + -(-batch * prompt_len // max(1, step_tokens - batch))


def decode_tok_s(engine: Any, batch: int, context: int, grid: Grid) -> dict[str, Any]:
    """`batch` requests of prompt + generated tokens = `context` each; tok/s over the last `grid.steps` steps
    in which every request decodes (median of up to 4 windows), after `grid.warmup` untimed decode steps (first
    calls of a static batch function load its kernels)."""
    plen = decode_prompt_len(context, grid)
    reqs = [engine.add_request(prompt_ids(i, plen, engine.vocab_size),
                               decode_params(engine, grid.sampling,
                                             decode_budget(grid, batch, plen, engine.step_token_budget), seed=i))
            for i in range(batch)]
    while not all(r.prefill_done for r in reqs):
        engine.step()
    for _ in range(grid.warmup):
        engine.step()
    if len(engine.running) != batch:
        raise RuntimeError(f"only {len(engine.running)} of {batch} requests run together; the KV cache is too small")
    # the timed steps in up to 4 windows; tok/s = the median window's: at batch 1 a step is ~4 ms, so one host
    # hiccup (GC, a page fault) in a single 32-step window moved the result by 10-15% between otherwise equal runs
    windows = max(1, min(4, grid.steps // 8))
    bounds = [grid.steps * w // windows for w in range(windows + 1)]
    rates, tokens, dt, partial = [], 0, 0.0, False
    for w in range(windows):
        done0, t0 = sum(len(r.output_ids) for r in reqs), time.perf_counter()
        for _ in range(bounds[w + 1] - bounds[w]):
            engine.step()
        wdt = time.perf_counter() - t0
        if len(engine.running) != batch and not partial:  # only where the context window leaves no headroom
            partial = True
            log.warning("batch %d context %d: a request finished inside the timed steps (%d of %d left)",
                        batch, context, len(engine.running), batch)
        wtok = sum(len(r.output_ids) for r in reqs) - done0
        rates.append(wtok / wdt)
        tokens, dt = tokens + wtok, dt + wdt
    _drain(engine)
    return {"tok_s": float(np.median(rates)), "tok_s_windows": [round(r, 1) for r in rates], "prompt_len": plen,
            "timed_tokens": tokens, "seconds": dt, "full_batch_every_step": not partial}


def profile_decode_steps(engine: Any, batch: int, context: int, grid: Grid, steps: int, max_tokens: int,
                         unprofiled_steps: int = 0
                         ) -> tuple[float | None, float, dict[str, list[float]], dict[str, Any]]:
    """GPU kernels of `steps` decode steps of `batch` requests at `context` (`grid.sampling`), through torch's CUPTI
    profiler, which sees TVM's kernels too, also those replayed from CUDA graphs. Returns seconds per step of
    `unprofiled_steps` timed first (None without; the profiler itself slows the host side), seconds per profiled
    step, {kernel name: [device microseconds in all, calls]} and `timeline_gaps`. The requests stay; drain the
    engine after."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    plen = decode_prompt_len(context, grid)
    reqs = [engine.add_request(prompt_ids(i, plen, engine.vocab_size),
                               decode_params(engine, grid.sampling, max_tokens, seed=i)) for i in range(batch)]
    while not all(r.prefill_done for r in reqs):
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    plain = None
    if unprofiled_steps:
        t0 = time.perf_counter()
        for _ in range(unprofiled_steps):
            engine.step()
        plain = (time.perf_counter() - t0) / unprofiled_steps
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    return plain, wall, _kernel_sums(prof), timeline_gaps(prof)


def _kernel_sums(prof: Any) -> dict[str, list[float]]:
    """{kernel name: [device microseconds in all, calls]} of a finished torch profiler."""
    import torch

    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            row = per.setdefault(ev.name, [0.0, 0])
            row[0] += getattr(ev, "device_time_total", 0) or ev.cuda_time_total
            row[1] += 1
    return per


def timeline_gaps(prof: Any, top: int = 12) -> dict[str, Any]:
    """Where the GPU sat idle in a finished torch profile: the span from the first kernel's start to the last one's
    end, the idle microseconds in it, the largest idle stretches by (kernel before, kernel after) and the host's
    CUDA API calls by total time (a long `cudaStreamSynchronize` or `cudaMemcpy` there is a host wait inside the
    model call; launches slower than the kernels show as many short gaps instead)."""
    import torch

    spans, api = [], {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
        elif ev.name.startswith("cu"):  # CUDA runtime / driver API calls on the host
            row = api.setdefault(ev.name, [0.0, 0])
            row[0] += ev.time_range.end - ev.time_range.start
            row[1] += 1
    spans.sort()
    pairs: dict[tuple[str, str], list[float]] = {}
    idle, end, prev = 0.0, None, ""
    for start, stop, name in spans:
        if end is not None and start > end:
            row = pairs.setdefault((prev[:60], name[:60]), [0.0, 0])
            row[0] += start - end
            row[1] += 1
            idle += start - end
        if end is None or stop > end:
            end, prev = stop, name
    span = (end - spans[0][0]) if spans else 0.0
    return {"span_us": span, "idle_us": idle,
            "gaps": [{"before": b, "after": a, "us": v[0], "count": v[1]}
                     for (b, a), v in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]],
            "host_api": [{"call": k, "us": v[0], "count": v[1]}
                         for k, v in sorted(api.items(), key=lambda kv: -kv[1][0])[:top]]}


def profile_prefill(engine: Any, tokens: int) -> tuple[float, float, dict[str, list[float]], dict[str, Any]]:
    """GPU kernels of one prefill of `tokens` prompt tokens (the engine chunking it by its prefill chunk), after a
    warm-up one and three timed unprofiled ones of the same length: median seconds of the unprofiled prefills,
    seconds of the profiled one, {kernel name: [device microseconds, calls]} and its `timeline_gaps`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    prefill_tok_s(engine, tokens, reps=1)  # first calls load kernels and fill the memory pool
    plain = prefill_tok_s(engine, tokens, reps=3)["seconds"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill_tok_s(engine, tokens, reps=1)
        torch.cuda.synchronize()
    return plain, time.perf_counter() - t0, _kernel_sums(prof), timeline_gaps(prof)


def prefill_tok_s(engine: Any, tokens: int, reps: int) -> dict[str, Any]:
    """One request of `tokens` prompt tokens (at most the context window - 1): add_request -> first token, the
    engine chunking the prompt by its prefill chunk; median of `reps` runs."""
    from vptq_mlc.runtime.sampling import SamplingParams

    n = min(tokens, engine.context_window - 1)  # a prompt must leave room for one new token
    times = []
    for rep in range(reps):
        t0 = time.perf_counter()
        req = engine.add_request(prompt_ids(rep, n, engine.vocab_size),
                                 SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while not req.output_ids:
            engine.step()
        times.append(time.perf_counter() - t0)
        _drain(engine)
    med = sorted(times)[len(times) // 2]
    return {"tok_s": n / med, "tokens": n, "seconds": med}


def _kv_bytes_per_token(model_config: dict[str, Any], dtype: str) -> int:
    """K and V of every layer for one token."""
    heads = int(model_config.get("num_key_value_heads") or model_config["num_attention_heads"])
    head_dim = int(model_config.get("head_dim") or model_config["hidden_size"] // model_config["num_attention_heads"])
    return 2 * int(model_config["num_hidden_layers"]) * heads * head_dim * (4 if dtype == "float32" else 2)


def run_engine_system(model_dir: str, lib_path: str, device: str, grid: Grid, work_dir: str, tile: int,
                      rec: Recorder, overlap: bool = True) -> None:
    """The whole grid for one library into `rec.out`: prefill first, then decode by ascending context (the
    long-context prompts cost most), each point recorded as soon as it is measured. `overlap` False: the engine
    reads each decode step's tokens before it queues the next (`Engine(overlap=False)`)."""
    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.library import load_library

    out = rec.out
    md = load_library(lib_path, device).metadata
    run_dir, info = prepare_weights(Path(model_dir), md["params"], Path(work_dir), tile)
    out.update(info)
    cfg = ChatConfig.load(run_dir)
    window = min(w for w in (cfg.context_window_size, int(md.get("context_window_size", -1))) if w > 0)
    compiled_batch = int(md.get("max_batch_size", -1))
    batches = [b for b in grid.batches if compiled_batch <= 0 or b <= compiled_batch]
    if not batches:
        raise ValueError(f"every batch in {grid.batches} exceeds the library's max_batch_size {compiled_batch}")
    # what each decode request of a batch reserves: its prompt and its new-token budget (decode_tok_s)
    plen = decode_prompt_len(min(max(grid.contexts), window), grid)
    held = {b: plen + decode_budget(grid, b, plen) for b in batches}
    kv_tokens = max(b * (-(-min(window, held[b]) // PAGE) * PAGE) for b in batches)
    t0 = time.perf_counter()
    engine = Engine(run_dir, lib_path, device=device, max_batch_size=max(batches),
                    max_total_tokens=max(kv_tokens, -(-window // PAGE) * PAGE), page_size=PAGE,
                    overlap=None if overlap else False)
    kv_total = engine.kv.total_pages * engine.kv.page_size
    sample = decode_params(engine, grid.sampling, 1, 0)
    out.update({
        "sampling": {"mode": grid.sampling, "temperature": sample.temperature, "top_p": sample.top_p,
                     "repetition_penalty": sample.repetition_penalty,
                     "on_device": engine.device_sampler is not None},
        "overlapped_decode": engine.overlap,
        "load_s": round(time.perf_counter() - t0, 1), "prefill_chunk_size": engine.prefill_chunk,
        "context_window": window, "max_batch_compiled": compiled_batch,
        "static_decode_batches": [n for n in range(1, max(batches) + 1)
                                  if engine.lib.has("decode" if n == 1 else f"batch_decode_b{n}")],
        "skipped_batches": [b for b in grid.batches if b not in batches],
        "kv_cache_tokens": kv_total,
        "kv_cache_bytes": kv_total * _kv_bytes_per_token(cfg.model_config, cfg.model_dtype),
        "decode": {}, "prefill": {},
    })
    rec.point()
    # warm-up: a full prefill chunk and a few single-sequence decode steps (first calls load kernels)
    prefill_tok_s(engine, engine.prefill_chunk, 1)
    decode_tok_s(engine, 1, min(window, min(grid.contexts)), dataclasses.replace(grid, steps=2, warmup=1))
    for n in grid.prefill:
        out["prefill"][str(n)] = r = prefill_tok_s(engine, n, grid.prefill_reps)
        rec.point()
        log.info("prefill %d: %.1f tok/s", r["tokens"], r["tok_s"])
    for ctx in sorted(grid.contexts):
        for b in batches:
            out["decode"][f"b{b}_ctx{ctx}"] = r = decode_tok_s(engine, b, min(ctx, window), grid)
            rec.point()
            log.info("decode batch %d context %d: %.1f tok/s", b, ctx, r["tok_s"])
