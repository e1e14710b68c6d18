"""How many KV-cache tokens fit the memory left after the weights (the default `max_total_tokens`).

Why: one context window shared by all sequences (the old default) lets a batch of 16 hold only 1/16 of a window
each, while the device usually has room for many windows. Like vLLM's `--gpu-memory-utilization`, the default
takes a fraction (`DEFAULT_KV_MEMORY_FRACTION`) of the memory free after the weights are loaded; it never takes
more than `max_batch` full context windows (no sequence can use more). GPUs report their free memory through TVM
(`Device.available_global_memory`); on the CPU it is the kernel's MemAvailable.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm

from vptq_mlc.errors import RuntimeLoadError

log = logging.getLogger(__name__)

DEFAULT_KV_MEMORY_FRACTION = 0.9
CPU_DEVICE_TYPE = 1
GIB = 1 << 30


def free_memory_bytes(device: tvm.runtime.Device) -> int | None:
    """Bytes free on `device` now, or None when the device does not say."""
    if device.dlpack_device_type() == CPU_DEVICE_TYPE:
        return _mem_available()
    try:
        free = device.available_global_memory
    except Exception:  # noqa: BLE001 - a runtime without the query: fall back to the caller's default
        return None
    return int(free) if free else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_bytes_per_token(model_config: dict[str, Any], dtype: str, kv_cache: dict[str, Any] | None = None) -> int | None:
    """One token's KV-cache bytes over every layer, or None if neither says the attention shape. `kv_cache`: the
    library's `_metadata.kv_cache` (compile/metadata.py), which wins: K and V per KV head (`attn_kind` mha), or one
    latent vector per layer (mla: DeepSeek's compressed KV and roped key, no separate V)."""
    if kv_cache and kv_cache.get("num_hidden_layers") and kv_cache.get("head_dim"):
        per_layer = int(kv_cache.get("num_key_value_heads") or 1) * int(kv_cache["head_dim"])
        pieces = 1 if kv_cache.get("attn_kind") == "mla" else 2
        return pieces * int(kv_cache["num_hidden_layers"]) * per_layer * np.dtype(dtype).itemsize
    layers = model_config.get("num_hidden_layers")
    heads = model_config.get("num_attention_heads")
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or (model_config.get("hidden_size", 0) // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * np.dtype(dtype).itemsize


def kv_cache_tokens(requested: int | None, bytes_per_token: int | None, free_bytes: int | None, max_batch: int,
                    context_window: int, page_size: int, device: str,
                    fraction: float = DEFAULT_KV_MEMORY_FRACTION) -> int:
    """KV slots to allocate: `requested` (checked against free memory) or the memory-sized default."""
    if bytes_per_token is None or free_bytes is None:
        if requested is None:
            log.info("KV cache: free memory on %s unknown; sized for one context window (%d tokens)", device,
                     context_window)
        return requested or context_window
    fit = int(free_bytes // bytes_per_token)
    if requested is not None:
        if requested > fit:
            raise RuntimeLoadError(
                f"--max-total-tokens {requested} needs {requested * bytes_per_token / GIB:.2f} GiB of KV cache but "
                f"only {free_bytes / GIB:.2f} GiB is free on {device}; it does not fit memory: use at most {fit}")
        return requested
    tokens = min(int(free_bytes * fraction // bytes_per_token), max_batch * context_window)
    tokens -= tokens % page_size
    if tokens < page_size:
        raise RuntimeLoadError(f"no memory left for the KV cache on {device} ({free_bytes / GIB:.2f} GiB free after "
                               "the weights); free memory or use a smaller model")
    if tokens < context_window:
        log.warning("KV cache: only %d tokens fit %s, less than one context window (%d)", tokens, device,
                    context_window)
    log.info("KV cache: %d tokens (%.2f GiB; %.0f%% of %.2f GiB free on %s, at most %d x %d)", tokens,
             tokens * bytes_per_token / GIB, fraction * 100, free_bytes / GIB, device, max_batch, context_window)
    return tokens
