"""Paged-KV decode attention that splits each sequence's cached length over CTAs (flash decoding).

TVM 0.27's `batch_decode_paged_kv` (`TIRPagedKVCache`'s decode kernel) runs one CTA per (sequence, KV head) that
walks the whole cached length 32 keys at a time: at batch 1 a Llama-2-7B layer has 32 CTAs for 132 SMs, and a
context of 128 tokens (2 MB of K/V per layer) takes 10.5 us per layer on an H100, latency rather than bandwidth.
This kernel has the same signature and results (output and log2-sum-exp) and:

- CTA = (sequence, KV head, slice): the cached length is cut into `splits` slices, chosen on the host from the
  shapes (`num_splits`: about `TARGET_CTAS` CTAs, at most `MAX_SPLITS`, at least `MIN_SLICE_KEYS` keys a slice on
  average); with one slice the CTA writes the output directly, otherwise each slice's normalised output and lse go
  to a workspace and a second launch merges them per (sequence, head) row (weights 2^(lse_s - max)).
- Inside a CTA, `d / 8` lanes own one key at a time (8 fp16 columns each: one 16-byte load of K and one of V per
  lane and key), so a warp reads 32 / (d / 8) consecutive keys; `UNROLL` keys per thread group are loaded before
  any is used. Every query head of the KV head's group is computed from the same registers: each K/V row is read
  once per KV head (GQA), and q of the whole group stays in registers (fp32, pre-scaled by sm_scale * log2(e)).
- Dot products are reduced over the key's lanes with xor shuffles; each thread group keeps an online softmax
  (running max in log2 units, TVM's -5e4 start) per query head; the groups of a CTA merge through shared memory.
- A row that sees no key gets output 0 and lse -5e4, as TVM's kernel leaves it.

RoPE is never applied here: our decoders rotate q and k before the cache (`RopeMode.NORMAL` / `NONE`), so the
runtime passes `rotary_mode` 0. The sliding-window decode kernel and MLA keep TVM's kernels.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.errors import compile_switch

DECODE_ATTN_ENV = "VPTQ_MLC_DECODE_ATTN"
TVM_DECODE_SYMBOL = "batch_decode_paged_kv"  # TIRPagedKVCache's decode kernel (no sliding window)
DECODE_SYMBOL = "batch_decode_paged_kv_split"
LOG2E = math.log2(math.e)
MASKED = -5e4  # TVM's initial running max and the lse of a row that sees no key
VEC = 8  # fp16 columns per lane: 16-byte loads
WARPS = 4
THREADS = 32 * WARPS
MAX_SPLITS = 32
TARGET_CTAS = 264  # split until about this many CTAs run (two per SM on an H100)
MIN_SLICE_KEYS = 32  # a slice of fewer keys on average is not worth its merge
MERGE_ROWS_PER_CTA = 4  # (sequence, head) rows merged per CTA of the second launch, one warp each
MAX_GROUP = 8  # query heads per KV head kept in registers


DECODE_ATTN_DEFAULT = True  # H100: 1.14x TVM's kernel at a 128-token context, 4.9x at 2048, 7.7x at 8192 (7B heads)


def decode_attn_switch() -> bool:
    """Whether the paged KV cache decodes with `paged_decode_split_kv`: on by default (docs/attention.md has the
    H100 timings); `VPTQ_MLC_DECODE_ATTN=0` keeps TVM's decode kernel."""
    return compile_switch(DECODE_ATTN_ENV, DECODE_ATTN_DEFAULT, "the split-KV decode attention kernel")


def decode_supported(h_kv: int, h_q: int, d: int, dtype: str) -> bool:
    """Shapes this kernel is built for (fp16 heads whose 16-byte chunks fill a warp evenly); others keep TVM's."""
    return (dtype == "float16" and d % VEC == 0 and 32 % (d // VEC) == 0 and h_q % h_kv == 0
            and h_q // h_kv <= MAX_GROUP)


def num_splits(batch: Any, nnz_pages: Any, h_kv: int, page_size: int, ops: Any = T, max_splits: int = MAX_SPLITS,
               min_slice_keys: int = MIN_SLICE_KEYS) -> Any:
    """Slices of every sequence's cached length: enough for `TARGET_CTAS` CTAs, at most `MAX_SPLITS`, and no more
    than `MIN_SLICE_KEYS` keys a slice on average (nnz_pages: pages of the whole batch). `ops` gives ceildiv, min
    and max: TIR (both launches evaluate the same expression on the host) or `IntOps` (tests)."""
    by_ctas = ops.ceildiv(TARGET_CTAS, batch * h_kv)
    by_keys = ops.max(1, ops.floordiv(nnz_pages * page_size, batch * min_slice_keys))
    return ops.max(1, ops.min(ops.min(by_ctas, by_keys), max_splits))


class IntOps:
    """`num_splits` over Python ints."""

    ceildiv = staticmethod(lambda a, b: -(-a // b))
    floordiv = staticmethod(lambda a, b: a // b)
    min = staticmethod(min)
    max = staticmethod(max)


def workspace_rows(h_kv: int) -> int:
    """Slice rows (sequence, slice) the workspace holds: splits > 1 only while batch * h_kv < TARGET_CTAS, and then
    batch * splits <= batch * ceil(TARGET_CTAS / (batch * h_kv)) < 2 * TARGET_CTAS / h_kv."""
    return 2 * -(-TARGET_CTAS // h_kv)


def paged_decode_split_kv(h_kv: int, h_q: int, d: int, dtype: str, page_size: int, unroll: int | None = None,
                          rescale: bool = True, max_splits: int = MAX_SPLITS,
                          min_slice_keys: int = MIN_SLICE_KEYS) -> tirx.PrimFunc:
    """`batch_decode_paged_kv` (TVM 0.27's signature, no sliding window) split over the cached length.

    `unroll`: keys a thread group loads before using them (default 4, 2 for groups of more than 4 heads: registers).
    `max_splits`, `min_slice_keys`: `num_splits`' bounds (the defaults; others for measurements).
    `rescale=False` builds a deliberately wrong kernel (the running sums are not rescaled when the running max
    grows) that the tests must catch."""
    if not decode_supported(h_kv, h_q, d, dtype):
        raise ValueError(f"no split-KV decode kernel for h_kv={h_kv} h_q={h_q} d={d} {dtype}")
    group = h_q // h_kv
    lanes = d // VEC  # lanes per key
    keys_per_warp = 32 // lanes
    groups = WARPS * keys_per_warp  # thread groups (keys in flight) per CTA
    unroll = unroll or (4 if group <= 4 else 2)
    step = groups * unroll  # keys per CTA iteration
    shuffles = int(math.log2(lanes))
    ws_rows = workspace_rows(h_kv)
    merge_lanes = math.gcd(d, 32)
    merge_cols = d // merge_lanes
    out_iters = -(-group * d // THREADS)

    def smem_slot(buf, kv: int, u, tx, ty):
        """fp16 offset of this lane's 8 columns of key slot u (of the step) in staging buffer `buf` (K: kv 0)."""
        return (((buf * 2 + kv) * unroll + u) * groups + ty * keys_per_warp + tx // lanes) * d + tx % lanes * VEC

    @T.macro
    def load_step(kv_smem, pages, page_values, seq, key, pos, it, by, tx, ty):
        # this thread group's keys of step `it` (past the slice: its last key, masked when used)
        for u in T.unroll(unroll):
            key[u] = T.min(seq[3] + it * step + u * groups + ty * keys_per_warp + tx // lanes, seq[4] - 1)
            pos[u] = page_values[seq[1] + key[u] // page_size]
        for u in T.unroll(unroll):
            for kv in T.unroll(2):
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(kv_smem[smem_slot(it % 2, kv, u, tx, ty)]),
                    pages.access_ptr("r", offset=(((T.Cast("int64", pos[u]) * 2 + kv) * h_kv + by) * page_size
                                                  + key[u] % page_size) * d + tx % lanes * VEC),
                    16))

    def splits_of(batch, nnz_pages):
        return num_splits(batch, nnz_pages, h_kv, page_size, T, max_splits, min_slice_keys)

    def rescale_factor(m_old, m_new):
        return T.exp2(m_old - m_new) if rescale else T.float32(1)

    @T.prim_func
    def batch_decode_paged_kv_split(
        var_q: T.handle,  # [batch, h_q, d]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch]: slots used in the last page
        var_k_rope_pos_offset: T.handle,  # [batch]
        var_q_rope_position: T.handle,  # [batch]
        var_output: T.handle,  # [batch, h_q, d]
        var_lse: T.handle,  # [batch, h_q]
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"global_symbol": DECODE_SYMBOL, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_elem_offset = T.int64()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        q = T.match_buffer(var_q, (batch, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype,
                               elem_offset=pages_elem_offset)
        page_indptr = T.match_buffer(var_page_indptr, (batch + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(var_length_info, (batch,), "int32", elem_offset=length_info_elem_offset)
        # the rope positions are part of the signature; q and k arrive rotated (see the module docstring)
        T.match_buffer(var_k_rope_pos_offset, (batch,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        T.match_buffer(var_q_rope_position, (batch,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (batch, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch, h_q), "float32")
        # each slice's normalised output and lse, row = sequence * splits + slice (used when splits > 1)
        o_part = T.alloc_buffer((ws_rows, h_q, d), "float32")
        lse_part = T.alloc_buffer((ws_rows, h_q), "float32")

        with T.launch_thread("blockIdx.x", batch) as bx:
            by = T.launch_thread("blockIdx.y", h_kv)
            bz = T.launch_thread("blockIdx.z", splits_of(batch, nnz_pages))
            tx = T.launch_thread("threadIdx.x", 32)
            ty = T.launch_thread("threadIdx.y", WARPS)
            q_in = T.alloc_buffer((group * VEC,), dtype, scope="local")
            qf = T.alloc_buffer((group * VEC,), "float32", scope="local")
            acc = T.alloc_buffer((group * VEC,), "float32", scope="local")
            kbuf = T.alloc_buffer((unroll * VEC,), dtype, scope="local")
            vbuf = T.alloc_buffer((unroll * VEC,), dtype, scope="local")
            score = T.alloc_buffer((unroll * group,), "float32", scope="local")
            m_run = T.alloc_buffer((group,), "float32", scope="local")
            l_run = T.alloc_buffer((group,), "float32", scope="local")
            m_new = T.alloc_buffer((group,), "float32", scope="local")
            alpha = T.alloc_buffer((group,), "float32", scope="local")
            fin = T.alloc_buffer((3,), "float32", scope="local")  # merged max, sum, output column
            kv_smem = T.alloc_buffer((2 * 2 * unroll * groups * d,), dtype, scope="shared.dyn")
            sm_o = T.alloc_buffer((groups, group, d), "float32", scope="shared.dyn")
            sm_ml = T.alloc_buffer((groups, group, 2), "float32", scope="shared.dyn")

            # per-CTA scalars live in registers (let-bound expressions would be re-inlined into every index)
            seq = T.alloc_buffer((5,), "int32", scope="local")  # splits, first page, kv_len, slice start, end
            key = T.alloc_buffer((unroll,), "int32", scope="local")  # this thread group's keys of the step
            pos = T.alloc_buffer((unroll,), "int32", scope="local")  # their pages
            seq[0] = splits_of(batch, nnz_pages)
            seq[1] = page_indptr[bx]
            seq[2] = T.if_then_else(seq[1] != page_indptr[bx + 1],
                                    (page_indptr[bx + 1] - seq[1] - 1) * page_size + length_info[bx], 0)
            # this CTA's keys: slices of whole CTA steps, so every slice but the last is full
            seq[3] = bz * (T.ceildiv(T.ceildiv(seq[2], seq[0]), step) * step)
            seq[4] = T.min(seq[3] + T.ceildiv(T.ceildiv(seq[2], seq[0]), step) * step, seq[2])
            # q of every head of the group, this lane's 8 columns, scaled to log2 units
            for h in T.unroll(group):
                for v in T.vectorized(VEC):
                    q_in[h * VEC + v] = q[bx, by * group + h, tx % lanes * VEC + v]
            for i in T.unroll(group * VEC):
                qf[i] = T.Cast("float32", q_in[i]) * (sm_scale * T.float32(LOG2E))
                acc[i] = T.float32(0)
            for h in T.unroll(group):
                m_run[h] = T.float32(MASKED)
                l_run[h] = T.float32(0)
            # K and V rows of a step go to shared memory with 16-byte cp.async, the next step in flight while this one
            # is computed; each lane reads back only the chunks it copied itself (no barrier needed)
            if seq[4] > seq[3]:
                load_step(kv_smem, pages, page_values, seq, key, pos, 0, by, tx, ty)
            T.evaluate(T.ptx["cp.async.commit_group"]())
            for it in range(T.ceildiv(T.max(seq[4] - seq[3], 0), step)):
                if it + 1 < T.ceildiv(T.max(seq[4] - seq[3], 0), step):
                    load_step(kv_smem, pages, page_values, seq, key, pos, it + 1, by, tx, ty)
                T.evaluate(T.ptx["cp.async.commit_group"]())
                T.evaluate(T.ptx["cp.async.wait_group"](1))
                for u in T.unroll(unroll):
                    key[u] = seq[3] + it * step + u * groups + ty * keys_per_warp + tx // lanes
                    kbuf[T.Ramp(u * VEC, 1, VEC)] = kv_smem[T.Ramp(smem_slot(it % 2, 0, u, tx, ty), 1, VEC)]
                    vbuf[T.Ramp(u * VEC, 1, VEC)] = kv_smem[T.Ramp(smem_slot(it % 2, 1, u, tx, ty), 1, VEC)]
                # scores: this lane's 8 products, summed over the key's lanes
                for u in T.unroll(unroll):
                    for h in T.unroll(group):
                        score[u * group + h] = T.float32(0)
                        for v in T.unroll(VEC):
                            score[u * group + h] = score[u * group + h] + qf[h * VEC + v] * T.Cast(
                                "float32", kbuf[u * VEC + v])
                        for sh in T.unroll(shuffles):
                            score[u * group + h] = score[u * group + h] + T.tvm_warp_shuffle_xor(
                                T.tvm_warp_activemask(), score[u * group + h], 1 << sh, 32, 32)
                # online softmax per head
                for h in T.unroll(group):
                    m_new[h] = m_run[h]
                    for u in T.unroll(unroll):
                        if key[u] < seq[4]:
                            m_new[h] = T.max(m_new[h], score[u * group + h])
                    alpha[h] = rescale_factor(m_run[h], m_new[h])
                    m_run[h] = m_new[h]
                    l_run[h] = l_run[h] * alpha[h]
                    for v in T.unroll(VEC):
                        acc[h * VEC + v] = acc[h * VEC + v] * alpha[h]
                    for u in T.unroll(unroll):
                        score[u * group + h] = T.if_then_else(
                            key[u] < seq[4], T.exp2(score[u * group + h] - m_run[h]), T.float32(0))
                        l_run[h] = l_run[h] + score[u * group + h]
                        for v in T.unroll(VEC):
                            acc[h * VEC + v] = acc[h * VEC + v] + score[u * group + h] * T.Cast(
                                "float32", vbuf[u * VEC + v])
            T.evaluate(T.ptx["cp.async.wait_group"](0))
            # merge the CTA's thread groups through shared memory; TVM's planner places sm_o over the staging
            # buffers, so every warp's copies must have landed and been read first (TVM's ThreadSync inserts the
            # same barrier; written out so the kernel does not rely on it)
            T.tvm_storage_sync("shared")
            for h in T.unroll(group):
                for v in T.unroll(VEC):
                    sm_o[ty * keys_per_warp + tx // lanes, h, tx % lanes * VEC + v] = acc[h * VEC + v]
                if tx % lanes == 0:
                    sm_ml[ty * keys_per_warp + tx // lanes, h, 0] = m_run[h]
                    sm_ml[ty * keys_per_warp + tx // lanes, h, 1] = l_run[h]
            T.tvm_storage_sync("shared")
            for e in T.unroll(out_iters):
                if e * THREADS + ty * 32 + tx < group * d:
                    fin[0] = T.float32(MASKED)
                    for g in T.unroll(groups):
                        fin[0] = T.max(fin[0], sm_ml[g, (e * THREADS + ty * 32 + tx) // d, 0])
                    fin[1] = T.float32(0)
                    fin[2] = T.float32(0)
                    for g in T.unroll(groups):
                        fin[1] = fin[1] + sm_ml[g, (e * THREADS + ty * 32 + tx) // d, 1] * T.exp2(
                            sm_ml[g, (e * THREADS + ty * 32 + tx) // d, 0] - fin[0])
                        fin[2] = fin[2] + sm_o[g, (e * THREADS + ty * 32 + tx) // d, (e * THREADS + ty * 32 + tx) % d
                                               ] * T.exp2(sm_ml[g, (e * THREADS + ty * 32 + tx) // d, 0] - fin[0])
                    fin[2] = T.if_then_else(fin[1] > T.float32(0), fin[2] / fin[1], T.float32(0))
                    fin[0] = T.if_then_else(fin[1] > T.float32(0), fin[0] + T.log2(fin[1]), T.float32(MASKED))
                    if seq[0] == 1:
                        output[bx, by * group + (e * THREADS + ty * 32 + tx) // d, (e * THREADS + ty * 32 + tx) % d
                               ] = T.Cast(dtype, fin[2])
                        if (e * THREADS + ty * 32 + tx) % d == 0:
                            lse[bx, by * group + (e * THREADS + ty * 32 + tx) // d] = fin[0]
                    else:
                        o_part[bx * seq[0] + bz, by * group + (e * THREADS + ty * 32 + tx) // d,
                               (e * THREADS + ty * 32 + tx) % d] = fin[2]
                        if (e * THREADS + ty * 32 + tx) % d == 0:
                            lse_part[bx * seq[0] + bz, by * group + (e * THREADS + ty * 32 + tx) // d] = fin[0]

        # merge the slices of every (sequence, head) row: one warp a row; one idle CTA when there is one slice
        with T.launch_thread("blockIdx.x", T.if_then_else(
                splits_of(batch, nnz_pages) > 1,
                T.ceildiv(batch * h_q, MERGE_ROWS_PER_CTA), 1)) as mbx:
            mty = T.launch_thread("threadIdx.y", MERGE_ROWS_PER_CTA)
            mtx = T.launch_thread("threadIdx.x", merge_lanes)
            mm = T.alloc_buffer((2,), "float32", scope="local")  # max lse, weight sum
            macc = T.alloc_buffer((merge_cols,), "float32", scope="local")
            msplits: T.let[T.int32] = splits_of(batch, nnz_pages)
            if msplits > 1 and mbx * MERGE_ROWS_PER_CTA + mty < batch * h_q:
                mm[0] = T.float32(MASKED)
                for s in range(msplits):
                    mm[0] = T.max(mm[0], lse_part[(mbx * MERGE_ROWS_PER_CTA + mty) // h_q * msplits + s,
                                                  (mbx * MERGE_ROWS_PER_CTA + mty) % h_q])
                mm[1] = T.float32(0)
                for k in T.unroll(merge_cols):
                    macc[k] = T.float32(0)
                for s in range(msplits):
                    mm[1] = mm[1] + T.exp2(lse_part[(mbx * MERGE_ROWS_PER_CTA + mty) // h_q * msplits + s,
                                                    (mbx * MERGE_ROWS_PER_CTA + mty) % h_q] - mm[0])
                    for k in T.unroll(merge_cols):
                        macc[k] = macc[k] + T.exp2(
                            lse_part[(mbx * MERGE_ROWS_PER_CTA + mty) // h_q * msplits + s,
                                     (mbx * MERGE_ROWS_PER_CTA + mty) % h_q] - mm[0]) * o_part[
                            (mbx * MERGE_ROWS_PER_CTA + mty) // h_q * msplits + s,
                            (mbx * MERGE_ROWS_PER_CTA + mty) % h_q, k * merge_lanes + mtx]
                for k in T.unroll(merge_cols):
                    output[(mbx * MERGE_ROWS_PER_CTA + mty) // h_q, (mbx * MERGE_ROWS_PER_CTA + mty) % h_q,
                           k * merge_lanes + mtx] = T.Cast(dtype, macc[k] / mm[1])
                if mtx == 0:
                    # every slice empty (a sequence with no key): TVM's lse of an empty row
                    lse[(mbx * MERGE_ROWS_PER_CTA + mty) // h_q, (mbx * MERGE_ROWS_PER_CTA + mty) % h_q] = (
                        T.if_then_else(mm[0] > T.float32(MASKED), mm[0] + T.log2(mm[1]), T.float32(MASKED)))

    return batch_decode_paged_kv_split


def decode_attn_pass(enabled: bool | None = None) -> tvm.transform.Pass:
    """Relax module pass: the paged KV cache's decode kernel (TVM's `batch_decode_paged_kv`, no sliding window)
    becomes `paged_decode_split_kv` of the same shapes where `decode_supported`, and the cache is created with it.
    Off (`enabled` False, default: `decode_attn_switch()`), and for modules without a paged KV cache, the module
    passes through unchanged. The switch is read here, not when the pass runs: a bad value is then a one-line
    CompileError, not an error TVM's pass machinery wraps into a traceback."""
    from vptq_mlc.tir_kernels.cuda_common import replace_prim_funcs

    on = decode_attn_switch() if enabled is None else enabled

    @tvm.transform.module_pass(opt_level=0, name="VPTQSplitKVDecode")
    def rewrite(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        if not on:
            return mod
        replacements = {}
        for gv, old in mod.functions.items():
            if not (isinstance(old, tirx.PrimFunc) and old.attrs is not None):
                continue
            if old.attrs.get("global_symbol") == TVM_DECODE_SYMBOL:
                q, pages = old.params[0], old.params[1]  # TVM 0.27: buffer parameters carry shape and dtype
                h_kv, h_q, d = int(pages.shape[2]), int(q.shape[1]), int(q.shape[2])
                if decode_supported(h_kv, h_q, d, str(q.dtype)):
                    replacements[gv] = (paged_decode_split_kv(h_kv, h_q, d, str(q.dtype), int(pages.shape[3])),
                                        DECODE_SYMBOL)
        return replace_prim_funcs(mod, replacements) if replacements else mod

    return rewrite
