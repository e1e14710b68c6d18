"""Paged-KV prefill attention that splits the cached length over CTAs (flash-decoding style) when the chunk is short.

TVM's paged prefill kernel (`batch_prefill_paged_kv` of `TIRPagedKVCache`) parallelises over query tiles and KV
heads only. A short chunk over a long cached context (a prompt whose prefix is already cached, the last piece of a
chunked prompt, a decode-sized step with a prefill row) then gets one CTA per KV head, each walking the whole
cached length: 16 tokens over 1,024 cached tokens of a 7B model take ~30 ms of a 40 ms step on an H100 (docs/
attention.md). This kernel has the same signature and results; its grid adds a split axis: when the chunk has at
most `SPLIT_TOKENS_MAX` tokens, CTA `(tile, head, s)` attends to the s-th slice of every sequence's cached length
and writes an un-normalised partial (output, log2-sum-exp) into a workspace, and a second kernel in the same
function merges the slices. Longer chunks keep one slice and write the output directly, as TVM's kernel does.

The tile loop, the online softmax and the schedule are TVM's own (`_make_prefill_macros`,
`_schedule_prefill_kernel` of `tvm.relax.frontend.nn.llm`), so the per-tile arithmetic is the reference kernel's.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx
from tvm.relax.frontend.nn.llm import _kernel_common as kc
from tvm.script import tirx as T

from vptq_mlc.tir_kernels.cuda_attention_mma import (
    PAGE_SIZE,
    RAGGED_SYMBOL,
    TVM_RAGGED_SYMBOL,
    make_tc_prefill,
    ragged_prefill_tc,
    tc_supported,
)
from vptq_mlc.tir_kernels.cuda_common import replace_prim_funcs

MAX_SPLITS = 16  # slices of the cached length per (query tile, KV head)
SPLIT_TOKENS_MAX = 64  # chunks up to this many tokens are split (the workspace holds this many rows)
TARGET_CTAS = 264  # split until about this many CTAs run (two per SM on an H100)
MERGE_ROWS_PER_CTA = 4  # (token, head) rows merged per CTA, one warp (or its first d lanes) each
TVM_PREFILL_SYMBOL = "batch_prefill_paged_kv"  # TIRPagedKVCache's paged prefill kernel (no sliding window)
SPLIT_SYMBOL = "batch_prefill_paged_kv_split"
# the tensor-core kernels where the shapes allow (fp16, d = 128), for every chunk: even 16 tokens over 1,024 cached
# ones run faster there than split over the tile loop (docs/attention.md)
TENSOR_CORE_LONG_CHUNKS = True


def num_splits(total_len: Any, batch_size: Any, group_size: int, tile_x: int, h_kv: int) -> Any:
    """Slices of the cached length for a chunk: enough for `TARGET_CTAS` CTAs, 1 for chunks over
    `SPLIT_TOKENS_MAX` tokens. Every CTA and the merge kernel evaluate the same expression."""
    tiles = T.ceildiv(total_len * group_size, tile_x) + batch_size - 1  # query tiles, at most
    wanted = T.min(T.max(T.ceildiv(TARGET_CTAS, tiles * h_kv), 1), MAX_SPLITS)
    return T.if_then_else(total_len <= SPLIT_TOKENS_MAX, wanted, 1)


def paged_prefill_split_kv(h_kv: int, h_q: int, d: int, dtype: str, page_size: int,
                           tensor_cores: bool | None = None) -> tirx.PrimFunc:
    """`batch_prefill_paged_kv` (TVM 0.27's signature, no sliding window) with the cached length split over CTAs
    for short chunks, plus the merge of the slices. RoPE is never applied here: our decoders rotate q and k before
    the cache (`RopeMode.NORMAL` / `NONE`), so the runtime passes `rotary_mode` 0 and the rope arguments go unused.

    `tensor_cores` (default `TENSOR_CORE_LONG_CHUNKS`, where the shapes allow): the function is the tensor-core
    kernel of `cuda_attention_mma` alone, for every chunk (no tile loop, no slice workspace)."""
    use_tc = tc_supported(h_kv, h_q, d, dtype, page_size) and (
        TENSOR_CORE_LONG_CHUNKS if tensor_cores is None else tensor_cores)
    tc_prefill = make_tc_prefill(h_kv, h_q, dtype) if use_tc else None
    target = tvm.target.Target("cuda")
    num_blks, _, group_size, bdx, num_warps, tile_x, tile_y, tile_z = kc._get_prefill_kernel_config(
        h_kv, h_q, d, dtype, target)
    init_states, compute_s_gemm, softmax_update, compute_o_gemm, _, advance_tile_batch, *_ = (
        kc._make_prefill_macros(tile_x, tile_y, tile_z, tile_y, bdx, num_warps, group_size))
    load_vec = 8 // ((tvm.runtime.DataType(dtype).bits + 7) // 8)
    merge_lanes = math.gcd(d, 32)  # lanes of the warp merging one row, each taking d / lanes columns
    per_lane = d // merge_lanes

    @T.macro
    def split_launches(q, q_indptr, pages, page_indptr, page_values, length_info, output, lse, o_part, lse_part,
                       causal, sm_scale, total_len, batch_size):
        # CTA-per-(tile, KV head, slice) tile loop (CUDA cores), then the merge of the slices
        # the launch has exactly as many slices as the chunk gets (computed on the host from the shapes)
        for lbx in T.thread_binding(num_blks, thread="blockIdx.x"):
            for lby in T.thread_binding(h_kv, thread="blockIdx.y"):
                for lbz in T.thread_binding(num_splits(total_len, batch_size, group_size, tile_x, h_kv),
                                            thread="blockIdx.z"):
                    for lty in T.thread_binding(num_warps, thread="threadIdx.y"):
                        for ltx in T.thread_binding(bdx, thread="threadIdx.x"):
                            with T.sblock("attn"):
                                bx, by, bz, ty, tx = T.axis.remap("SSSSS", [lbx, lby, lbz, lty, ltx])
                                T.reads()
                                T.writes()
                                tile_id, batch_idx, batch_tiles, batch_rows, iterator, kv_chunk_len = (
                                    kc._alloc_tile_walk_state())
                                Q_smem, K_smem, V_smem, O_local = kc._alloc_mha_qkvo_buffers(
                                    tile_x, tile_z, d, d, dtype)
                                S_smem, S_local, m_smem, m_prev_smem, d_smem, m_new, m_prev, d_new = (
                                    kc._alloc_softmax_state_buffers(tile_x, tile_z, bdx, num_warps))
                                splits: T.let[T.int32] = num_splits(total_len, batch_size, group_size, tile_x, h_kv)

                                tile_id[0] = bx
                                batch_idx[0] = 0
                                batch_rows[0] = (q_indptr[1] - q_indptr[0]) * group_size
                                batch_tiles[0] = T.ceildiv(batch_rows[0], tile_x)
                                while T.tvm_thread_invariant(batch_idx[0] < batch_size):
                                    advance_tile_batch(tile_id, batch_idx, batch_tiles, batch_rows, q_indptr,
                                                       batch_size)
                                    if T.tvm_thread_invariant(batch_idx[0] < batch_size):
                                        b_idx: T.let[T.int32] = batch_idx[0]
                                        LH_start: T.let[T.int32] = tile_id[0] * tile_x
                                        q_indptr_val: T.let[T.int32] = q_indptr[b_idx]
                                        page_begin: T.let[T.int32] = page_indptr[b_idx]
                                        page_end: T.let[T.int32] = page_indptr[b_idx + 1]
                                        kv_chunk_len[0] = T.if_then_else(
                                            page_begin != page_end,
                                            kc._get_kv_chunk_len(page_end - page_begin, page_size, b_idx,
                                                                 length_info, False),
                                            0,
                                        )
                                        # this CTA's slice of the cached length, whole KV tiles (written as
                                        # multiples of tile_z so page indices simplify as in TVM's kernel)
                                        slice_tiles: T.let[T.int32] = T.ceildiv(
                                            T.ceildiv(kv_chunk_len[0], splits), tile_z)
                                        kv_end: T.let[T.int32] = T.min((bz + 1) * slice_tiles * tile_z,
                                                                       kv_chunk_len[0])
                                        T.tvm_storage_sync("shared")

                                        init_states(m_smem, d_smem, O_local, ty, tx)

                                        for li, lj in T.grid(tile_x, tile_y):
                                            with T.sblock("Q_load"):
                                                i, j = T.axis.remap("SS", [li, lj])
                                                T.reads()
                                                T.writes()
                                                cur_L: T.let[T.int32] = q_indptr_val + (LH_start + i) // group_size
                                                cur_H_qo: T.let[T.int32] = (
                                                    by * group_size + (LH_start + i) % group_size)
                                                if cur_L < q_indptr[b_idx + 1]:
                                                    Q_smem[i, j] = q[cur_L, cur_H_qo, j]
                                                else:
                                                    Q_smem[i, j] = 0.0
                                        T.tvm_storage_sync("shared")

                                        for iterator in T.serial(T.ceildiv(
                                                T.max(kv_end - bz * slice_tiles * tile_z, 0), tile_z)):
                                            L_kv_start: T.let[T.int32] = (bz * slice_tiles + iterator) * tile_z
                                            for lz, ly in T.grid(tile_z, tile_y):
                                                with T.sblock("K_load"):
                                                    i, j = T.axis.remap("SS", [lz, ly])
                                                    T.reads()
                                                    T.writes()
                                                    cur_L: T.let[T.int32] = L_kv_start + i
                                                    if cur_L < kv_end:
                                                        page_no: T.let[T.int32] = page_values[
                                                            page_begin + T.floordiv(cur_L, page_size)]
                                                        page_offset: T.let[T.int32] = T.floormod(cur_L, page_size)
                                                        K_smem[i, j] = pages[page_no, 0, by, page_offset, j]
                                                    else:
                                                        K_smem[i, j] = 0.0
                                            T.tvm_storage_sync("shared")
                                            for lz, ly in T.grid(tile_z, tile_y):
                                                with T.sblock("V_load"):
                                                    i, j = T.axis.remap("SS", [lz, ly])
                                                    T.reads()
                                                    T.writes()
                                                    cur_L: T.let[T.int32] = L_kv_start + i
                                                    if cur_L < kv_end:
                                                        page_no: T.let[T.int32] = page_values[
                                                            page_begin + T.floordiv(cur_L, page_size)]
                                                        page_offset: T.let[T.int32] = T.floormod(cur_L, page_size)
                                                        V_smem[i, j] = pages[page_no, 1, by, page_offset, j]
                                                    else:
                                                        V_smem[i, j] = 0.0
                                            T.tvm_storage_sync("shared")

                                            compute_s_gemm(Q_smem, K_smem, S_local, S_smem, sm_scale)
                                            softmax_update(S_smem, m_smem, d_smem, m_prev_smem, m_new, m_prev,
                                                           d_new, ty, tx, LH_start, L_kv_start, causal,
                                                           kv_chunk_len[0], q_indptr[b_idx + 1] - q_indptr[b_idx],
                                                           0)
                                            compute_o_gemm(S_smem, V_smem, O_local, m_prev_smem, m_smem)

                                        # one slice: the output itself; several: this slice's partial state
                                        for li, lj in T.grid(tile_x, tile_y):
                                            with T.sblock("O_store"):
                                                i, j = T.axis.remap("SS", [li, lj])
                                                cur_L: T.let[T.int32] = q_indptr[b_idx] + (LH_start + i) // group_size
                                                cur_H_qo: T.let[T.int32] = (
                                                    by * group_size + (LH_start + i) % group_size)
                                                if cur_L < q_indptr[b_idx + 1]:
                                                    if splits == 1:
                                                        output[cur_L, cur_H_qo, j] = T.cast(
                                                            O_local[i, j] / d_smem[i], dtype)
                                                    else:
                                                        o_part[bz, cur_L, cur_H_qo, j] = O_local[i, j] / d_smem[i]
                                        for li in T.grid(tile_x):
                                            with T.sblock("lse_store"):
                                                i = T.axis.remap("S", [li])
                                                cur_L: T.let[T.int32] = q_indptr[b_idx] + (LH_start + i) // group_size
                                                cur_H_qo: T.let[T.int32] = (
                                                    by * group_size + (LH_start + i) % group_size)
                                                if cur_L < q_indptr[b_idx + 1]:
                                                    if splits == 1:
                                                        lse[cur_L, cur_H_qo] = m_smem[i] + T.log2(d_smem[i])
                                                    else:
                                                        lse_part[bz, cur_L, cur_H_qo] = m_smem[i] + T.log2(d_smem[i])
                                        tile_id[0] += num_blks

        # merge the slices of every (token, head) row: one warp a row
        for mbx in T.thread_binding(T.if_then_else(num_splits(total_len, batch_size, group_size, tile_x, h_kv) > 1,
                                                   T.ceildiv(total_len * h_q, MERGE_ROWS_PER_CTA), 1),
                                    thread="blockIdx.x"):
            for mty in T.thread_binding(MERGE_ROWS_PER_CTA, thread="threadIdx.y"):
                for mtx in T.thread_binding(merge_lanes, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        vbx, vty, vtx = T.axis.remap("SSS", [mbx, mty, mtx])
                        T.reads()
                        T.writes()
                        m_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        w_sum = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((per_lane,), "float32", scope="local")
                        splits_m: T.let[T.int32] = num_splits(total_len, batch_size, group_size, tile_x, h_kv)
                        row: T.let[T.int32] = vbx * MERGE_ROWS_PER_CTA + vty
                        tok: T.let[T.int32] = row // h_q
                        head: T.let[T.int32] = row % h_q
                        if splits_m > 1 and tok < total_len:
                            m_max[0] = -5e4
                            for s in T.serial(splits_m):
                                m_max[0] = T.max(m_max[0], lse_part[s, tok, head])
                            w_sum[0] = 0.0
                            for k in T.serial(per_lane):
                                acc[k] = 0.0
                            for s in T.serial(splits_m):
                                w: T.let[T.float32] = T.exp2(lse_part[s, tok, head] - m_max[0])
                                w_sum[0] += w
                                for k in T.serial(per_lane):
                                    acc[k] += w * o_part[s, tok, head, k * merge_lanes + vtx]
                            for k in T.serial(per_lane):
                                output[tok, head, k * merge_lanes + vtx] = T.cast(acc[k] / w_sum[0], dtype)
                            if vtx == 0:
                                lse[tok, head] = m_max[0] + T.log2(w_sum[0])

    # pylint: disable=too-many-branches,too-many-statements
    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_split(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch_size]: slots used in the last page
        var_k_rope_pos_offset: T.handle,  # [batch_size]
        var_q_rope_position: T.handle,  # [total_len]
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"global_symbol": SPLIT_SYMBOL})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_elem_offset = T.int64()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype,
                               elem_offset=pages_elem_offset)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        # the rope positions are part of the signature; q and k arrive rotated (see the docstring)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)

        if use_tc:
            tc_prefill(q, q_indptr, pages, pages, page_indptr, page_values, length_info, output, lse, causal,
                       sm_scale, total_len, batch_size)
        else:
            # each slice's normalised output and log2-sum-exp, for chunks of at most SPLIT_TOKENS_MAX tokens
            o_part = T.alloc_buffer((MAX_SPLITS, SPLIT_TOKENS_MAX, h_q, d), "float32")
            lse_part = T.alloc_buffer((MAX_SPLITS, SPLIT_TOKENS_MAX, h_q), "float32")
            split_launches(q, q_indptr, pages, page_indptr, page_values, length_info, output, lse, o_part,
                           lse_part, causal, sm_scale, total_len, batch_size)

    # pylint: enable=too-many-branches,too-many-statements

    if use_tc:  # hand-scheduled
        return batch_prefill_paged_kv_split.with_attr("tirx.is_scheduled", True)
    sch = tvm.s_tir.Schedule(batch_prefill_paged_kv_split)
    sch = kc._schedule_prefill_kernel(sch, load_vec, bdx, num_warps, tile_x, tile_y, tile_z, False, False)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def split_kv_prefill_pass() -> tvm.transform.Pass:
    """Relax module pass: the paged KV cache's prefill kernel (TVM's `batch_prefill_paged_kv`) becomes
    `paged_prefill_split_kv` of the same shapes under its own name, and, with `TENSOR_CORE_LONG_CHUNKS` where the
    shapes allow (fp16, d = 128), its ragged prefill kernel (`batch_prefill_ragged_kv`) becomes the tensor-core
    `ragged_prefill_tc`; the cache is created with them (the runtime receives the kernels as function values).
    Modules without a paged KV cache pass through."""

    @tvm.transform.module_pass(opt_level=0, name="VPTQSplitKVPrefill")
    def rewrite(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        replacements = {}
        for gv, old in mod.functions.items():
            if not (isinstance(old, tirx.PrimFunc) and old.attrs is not None):
                continue
            symbol = old.attrs.get("global_symbol")
            if symbol == TVM_PREFILL_SYMBOL:
                q, pages = old.params[0], old.params[2]  # TVM 0.27: buffer parameters carry shape and dtype
                replacements[gv] = (paged_prefill_split_kv(int(pages.shape[2]), int(q.shape[1]), int(q.shape[2]),
                                                           str(q.dtype), int(pages.shape[3])), SPLIT_SYMBOL)
            elif symbol == TVM_RAGGED_SYMBOL and TENSOR_CORE_LONG_CHUNKS:
                q, k, v = old.params[0], old.params[2], old.params[3]
                h_kv, h_q, d = int(k.shape[1]), int(q.shape[1]), int(q.shape[2])
                if int(v.shape[2]) == d and tc_supported(h_kv, h_q, d, str(q.dtype), PAGE_SIZE):
                    replacements[gv] = (ragged_prefill_tc(h_kv, h_q, d, str(q.dtype)), RAGGED_SYMBOL)
        return replace_prim_funcs(mod, replacements) if replacements else mod

    return rewrite
