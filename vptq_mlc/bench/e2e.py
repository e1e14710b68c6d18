"""End-to-end greedy decode through a model library's single-sequence `prefill` + `decode` functions.

`decode` has a static batch of one, so on CUDA every quantized linear in it runs the hand-scheduled VQ-GEMV
(registry: static rows 1..8); `Engine` uses `batch_decode` (symbolic batch) instead. Imports only the runtime
side (tvm.runtime + numpy), so it runs on a runtime-only GPU host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DecodeRun:
    tokens: list[int]
    prefill_s: float
    decode_tok_s: float
    decode_ms_per_tok: float
    logits: list[np.ndarray] | None = None  # with keep_logits: the float32 logits that chose each token


def greedy_decode(model_dir: str | Path, lib_path: str | Path, device: str, prompt_ids: list[int],
                  new_tokens: int = 32, warmup: int = 2, context: int | None = None,
                  keep_logits: bool = False) -> DecodeRun:
    """Prefill `prompt_ids`, then `new_tokens` greedy decode steps; times the decode steps (after warmup).
    `keep_logits`: also return the logits row behind every token (for teacher-forced comparisons)."""
    import tvm
    from tvm.runtime import ShapeTuple

    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.runtime.kv_cache import PagedKVCache
    from vptq_mlc.runtime.library import load_library, load_params

    cfg = ChatConfig.load(Path(model_dir))
    lib = load_library(lib_path, device)
    params = load_params(model_dir, lib, cfg.model_config)
    ctx = context or min(cfg.context_window_size, len(prompt_ids) + new_tokens + warmup + 16)
    kv = PagedKVCache(lib, 1, ctx, min(cfg.prefill_chunk_size, ctx), 16)
    embed, prefill, decode = lib.func("embed"), lib.func("prefill"), lib.func("decode")
    reshape = tvm.get_global_func("vm.builtin.reshape")
    dev = lib.device
    kv.add(0)

    def emb(ids: list[int]):
        e = embed(tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), dev), params)
        return reshape(e, ShapeTuple([1, len(ids), int(e.shape[-1])]))

    t0 = time.perf_counter()
    with kv.forward([0], [len(prompt_ids)]) as k:
        logits = prefill(emb(prompt_ids), k, params)[0].numpy()
    prefill_s = time.perf_counter() - t0
    tokens = [int(np.argmax(logits.reshape(-1)))]
    kept = [logits.reshape(-1).astype(np.float32)]
    times = []
    for step in range(new_tokens - 1 + warmup):
        t = time.perf_counter()
        with kv.forward([0], [1]) as k:
            out = decode(emb([tokens[-1]]), k, params)[0]
        row = out.numpy().reshape(-1)  # .numpy() synchronizes
        tok = int(np.argmax(row))
        times.append(time.perf_counter() - t)
        if step < new_tokens - 1:
            tokens.append(tok)
            if keep_logits:
                kept.append(row.astype(np.float32))
    dt = float(np.median(times[warmup:])) if len(times) > warmup else float(np.median(times))
    return DecodeRun(tokens, prefill_s, 1.0 / dt, dt * 1e3, kept if keep_logits else None)
