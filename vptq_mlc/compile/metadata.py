"""The library's `_metadata` function (MLC-LLM's JSON: params, KV cache shape, planned memory per function)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import tvm
from tvm import relax
from tvm.relax.frontend import nn

from vptq_mlc.model.config import DecoderConfig


def planned_memory(lowered: tvm.IRModule) -> dict[str, int]:
    """Bytes of storage each Relax function allocates after static memory planning (MLC's memory_usage).

    Walks only the bindings (and the branches of `If`s), not every sub-expression: a Python callback per node took
    minutes on a 126-layer model (the 405B shape), where the bindings are all that can be an allocation."""
    # before / after LowerRuntimeBuiltin (the pipelines here hand over the lowered module: relax.vm.alloc_storage)
    allocs = (tvm.ir.Op.get("relax.memory.alloc_storage"), tvm.ir.Op.get("relax.vm.alloc_storage"))

    def storage(e: Any) -> int:
        if isinstance(e, relax.SeqExpr):
            return sum(storage(b.value) for blk in e.blocks for b in blk.bindings) + storage(e.body)
        if isinstance(e, relax.If):
            return storage(e.true_branch) + storage(e.false_branch)
        if isinstance(e, relax.Function):
            return storage(e.body)
        if (isinstance(e, relax.Call) and any(e.op.same_as(a) for a in allocs)
                and isinstance(e.args[0], relax.ShapeExpr)):
            size = e.args[0].values[0]
            return int(size.value) if isinstance(size, tvm.tirx.IntImm) else 0
        return 0

    return {gv.name_hint: storage(f) for gv, f in lowered.functions.items() if isinstance(f, relax.Function)}


def model_metadata(
    *,
    model_type: str,
    quantization: str,
    cfg: DecoderConfig,
    params: Sequence[tuple[str, nn.Parameter]],
    memory_usage: Mapping[str, int],
    split: Mapping[str, Any] | None = None,
    target: Mapping[str, Any] | None = None,
    latent_kv_cache: bool = False,
) -> dict[str, Any]:
    """MLC's keys, plus `split` (function names and parameter names per function of the layer split,
    model/split.py) when the library was compiled with `--split-functions`, and `target` (llvm: the CPU arch and
    the /proc/cpuinfo features the code needs, checked at load time). `kv_cache` says what one token's cache
    entry is: K and V of `num_key_value_heads` heads of `head_dim` (`attn_kind` mha), or with `latent_kv_cache`
    one latent vector of `head_dim` = kv_lora_rank + qk_rope_head_dim per layer (`attn_kind` mla)."""
    meta = {
        "model_type": model_type,
        "quantization": quantization,
        "context_window_size": cfg.context_window_size,
        "sliding_window_size": cfg.sliding_window_size,
        "attention_sink_size": -1,
        "prefill_chunk_size": cfg.prefill_chunk_size,
        "max_batch_size": cfg.max_batch_size,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "kv_state_kind": "kv_cache",
        "model_task": "chat",
        "params": [
            {"name": name, "shape": [int(d) for d in p.shape], "dtype": p.dtype, "preprocs": [], "pipeline_stages": [0]}
            for name, p in params
        ],
        "kv_cache": {
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": 1 if latent_kv_cache else cfg.num_key_value_heads,
            "head_dim": cfg.kv_lora_rank + cfg.qk_rope_head_dim if latent_kv_cache else cfg.head_dim,
            "attn_kind": "mla" if latent_kv_cache else "mha",
        },
        "memory_usage": dict(memory_usage),
    }
    if split is not None:
        meta["split"] = dict(split)
    if target:
        meta["target"] = dict(target)
    return meta


def attach_metadata(mod: tvm.IRModule, metadata: Mapping[str, Any]) -> tvm.IRModule:
    """Add `_metadata() -> str` (a constant, so it needs no lowering and can join an already-lowered module)."""
    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata)))
    return bb.get()
