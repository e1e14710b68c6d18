"""The CUDA pipeline's paged prefill attention is ours (tir_kernels/cuda_attention_split_kv.py): the paged KV cache
is created with it instead of TVM's kernel, with the shapes of the kernel it replaces. Its numbers are checked on
the GPU against a float64 reference (tests/gpu/test_attention_split_kv_gpu.py, bench/attention_prefill.py)."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")


def _cache_module(h_kv: int, h_q: int, d: int):
    """A Relax function creating a paged KV cache, as a model library exports it (TVM's kernels bound by name)."""
    from tvm import relax as rx
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    class Cache(nn.Module):
        def create(self, n: int):
            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=n, max_total_seq_len=n, prefill_chunk_size=n, page_size=16,
                support_sliding_window=0, layer_partition=rx.ShapeExpr([0, 1]), num_hidden_layers=1,
                num_attention_heads=h_q, num_key_value_heads=h_kv, qk_head_dim=d, v_head_dim=d,
                mla_original_qk_head_dim=0, mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1,
                rope_theta=1e4, rope_scaling={}, rope_ext_factors=rx.prim_value(0), rotary_dim=d,
                enable_disaggregation=False, dtype="float16", target=tvm.target.Target("cuda"))

    mod, _ = Cache().export_tvm(spec={"create": {"n": int, "$": {"param_mode": "none", "effect_mode": "none"}}})
    return mod


def _symbols(mod) -> dict[str, object]:
    return {f.attrs["global_symbol"]: f for f in mod.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "global_symbol" in f.attrs}


@pytest.mark.parametrize("h_kv,h_q", [(4, 4), (2, 8)])
def test_cache_is_created_with_our_prefill_kernel_of_the_same_shapes(h_kv, h_q):
    from vptq_mlc.tir_kernels.cuda_attention_split_kv import split_kv_prefill_pass

    mod = _cache_module(h_kv, h_q, 64)
    out = split_kv_prefill_pass()(mod)
    before, after = _symbols(mod), _symbols(out)
    assert "batch_prefill_paged_kv" in before and "batch_prefill_paged_kv" not in after
    new = after["batch_prefill_paged_kv_split"]
    assert set(before) - {"batch_prefill_paged_kv"} == set(after) - {"batch_prefill_paged_kv_split"}
    assert "batch_prefill_paged_kv_split" in out["create"].script()  # the cache is created with it
    q, pages = new.params[0], new.params[2]
    assert [int(q.shape[1]), int(q.shape[2])] == [h_q, 64]
    assert [int(pages.shape[2]), int(pages.shape[3]), int(pages.shape[4])] == [h_kv, 16, 64]
    assert len(new.params) == len(before["batch_prefill_paged_kv"].params)


def test_modules_without_a_paged_cache_pass_through():
    from vptq_mlc.tir_kernels.cuda_attention_split_kv import split_kv_prefill_pass

    mod = tvm.IRModule({})
    assert split_kv_prefill_pass()(mod).same_as(mod)


def test_cuda_pipeline_runs_the_pass_first():
    from vptq_mlc.compile.targets import resolve_backend

    (bt,) = resolve_backend("cuda", "sm_90")
    assert bt.passes()[0].info.name == "VPTQSplitKVPrefill"


def test_fp16_heads_of_128_get_the_tensor_core_kernels():
    """d = 128 in fp16: the paged kernel has the tensor-core launch for long chunks, and the ragged kernel (the
    chunk over its own keys) is replaced by the tensor-core one; the cache is created with both."""
    from vptq_mlc.tir_kernels.cuda_attention_mma import RAGGED_SYMBOL
    from vptq_mlc.tir_kernels.cuda_attention_split_kv import split_kv_prefill_pass

    mod = _cache_module(2, 8, 128)
    out = split_kv_prefill_pass()(mod)
    before, after = _symbols(mod), _symbols(out)
    assert "batch_prefill_ragged_kv" in before and "batch_prefill_ragged_kv" not in after
    assert set(before) - {"batch_prefill_paged_kv", "batch_prefill_ragged_kv"} == (
        set(after) - {"batch_prefill_paged_kv_split", RAGGED_SYMBOL})
    create = out["create"].script()
    assert "batch_prefill_paged_kv_split" in create and RAGGED_SYMBOL in create
    ragged, old = after[RAGGED_SYMBOL], before["batch_prefill_ragged_kv"]
    assert len(ragged.params) == len(old.params)
    q, k = ragged.params[0], ragged.params[2]
    assert [int(q.shape[1]), int(k.shape[1]), int(k.shape[2])] == [8, 2, 128]
