"""Prefill attention on tensor cores (FlashAttention-2 style, mma.sync m16n8k16): the paged kernel's launch for long
chunks (pasted into `cuda_attention_split_kv`'s function) and a whole replacement of TVM's ragged prefill kernel.

The CUDA-core tile loop of TVM's prefill kernel (and of `cuda_attention_split_kv`) multiplies scores and values one
fp32 FMA at a time; at 512-2,048 prompt tokens it dominates the prefill (docs/attention.md). This kernel computes
the same results (TVM 0.27's `batch_prefill_paged_kv` / `batch_prefill_ragged_kv` signatures and conventions) with
the tensor cores:

- CTA = (query tile, KV head), 4 warps. A query tile is 64 rows of (token, head-in-group) pairs, as in TVM's
  kernel, so the heads of a group share every K and V tile; each warp owns 16 rows, held for the whole loop as
  `ldmatrix` A fragments (d = 128: 8 k16 steps).
- KV tiles of 64 keys: K and V rows come from the pages (a key's page from `page_values`; or the ragged k and v
  rows) into XOR-swizzled shared memory with 16-byte `cp.async`, double-buffered (tile t + 1 is in flight while
  tile t is multiplied). Keys past the sequence are clamped to its last key (real memory) and masked.
- S = Q K^T (K rows are the `col` operand, as the dense GEMM's weight rows); masking (key >= kv_len, causal: key >
  kv_len - qo_len + token) and the online softmax run on the accumulator fragments (row max across the 4 lanes of
  a quad with shuffles, exp2 of scores scaled by sm_scale * log2(e)); P is re-packed from the S accumulators into
  fp16 A fragments in registers (the accumulator of n-tiles 2k, 2k + 1 is the A fragment of k16 step k) and
  O += P V takes V fragments from `ldmatrix.trans`.
- Causal tiles stop at the last key any row of the tile sees; tiles every row sees whole skip the mask.
  Output = O / l, lse = m + log2(l) (log2 units); a row that sees no key at all gets output 0 and lse -5e4, as
  TVM's kernel leaves it.

Masked scores are -5e4 (TVM's convention), so a fully masked first tile leaves a finite state that the next
visible tile's rescale factor (2^(-5e4 - m) = 0) wipes out.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

ROWS = 64  # (token, head-in-group) rows per CTA, 16 per warp
KEYS = 64  # keys per KV tile
WARPS = 4
HEAD_DIM = 128
PAGE_SIZE = 16
LOG2E = math.log2(math.e)
MASKED = -5e4  # TVM's masked score and initial running max
CHUNKS = HEAD_DIM // 8  # 16-byte chunks per shared row
THREADS = 32 * WARPS
S_TILES = KEYS // 8  # 8-key n-tiles of S per warp
O_TILES = HEAD_DIM // 8  # 8-column n-tiles of O per warp
SMEM_HALVES = (ROWS + 4 * KEYS) * HEAD_DIM  # Q, then K[2], then V[2]


def tc_supported(h_kv: int, h_q: int, d: int, dtype: str, page_size: int) -> bool:
    """Shapes this kernel is built for; others keep the CUDA-core tile loop."""
    return dtype == "float16" and d == HEAD_DIM and page_size == PAGE_SIZE and h_q % h_kv == 0


def max_tiles(total_len, batch_size, group_size: int):
    """Query tiles of a chunk, at most (every sequence may end with a partial tile): the launch's grid size."""
    return T.ceildiv(total_len * group_size, ROWS) + batch_size - 1


class AttnLayout:
    """Shared-memory offsets (fp16 elements) and ldmatrix row addresses, as arithmetic on ints, numpy arrays and TIR
    expressions alike (the kernel and tests/test_attention_mma.py's CPU emulation use the same functions)."""

    @staticmethod
    def swizzle(row, chunk):
        """Row-major rows of 128 halves (256 bytes); chunk XOR (row % 8): the 8 rows one ldmatrix matrix reads
        land in 8 different 16-byte bank groups."""
        return row * HEAD_DIM + (chunk ^ (row % 8)) * 8

    @staticmethod
    def q_slot(row, chunk):
        return AttnLayout.swizzle(row, chunk)

    @staticmethod
    def k_slot(buf, row, chunk):
        return (ROWS + buf * KEYS) * HEAD_DIM + AttnLayout.swizzle(row, chunk)

    @staticmethod
    def v_slot(buf, row, chunk):
        return (ROWS + 2 * KEYS + buf * KEYS) * HEAD_DIM + AttnLayout.swizzle(row, chunk)

    @staticmethod
    def q_frag(warp, kk, lane):
        """A fragment of the warp's 16 rows at k16 step kk: lanes 0-15 rows 0-15 at d 0-7, lanes 16-31 at d 8-15."""
        return AttnLayout.q_slot(warp * 16 + lane % 16, kk * 2 + lane // 16)

    @staticmethod
    def k_frag(buf, j, kk, lane):
        """B fragments of key n-tiles 2j, 2j + 1 at k16 step kk (keys are the n index, d the k index): matrices
        (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15)."""
        return AttnLayout.k_slot(buf, j * 16 + lane // 16 * 8 + lane % 8, kk * 2 + lane // 8 % 2)

    @staticmethod
    def v_frag(buf, kk, dj, lane):
        """With `.trans`: B fragments of d n-tiles 2dj, 2dj + 1 at key k16 step kk (keys are the k index):
        matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)."""
        return AttnLayout.v_slot(buf, kk * 16 + lane // 8 % 2 * 8 + lane % 8, dj * 2 + lane // 16)

    @staticmethod
    def acc_row(warp, lane, c):
        """CTA-local row of accumulator c (0-3) of any n-tile: rows g and g + 8 of the warp (g = lane / 4)."""
        return warp * 16 + lane // 4 + c // 2 * 8

    @staticmethod
    def acc_col(j, lane, c):
        """Column (key or d) of accumulator c of n-tile j: 2q and 2q + 1 (q = lane % 4)."""
        return j * 8 + lane % 4 * 2 + c % 2


def make_tc_prefill(h_kv: int, h_q: int, dtype: str, paged: bool = True):
    """The tensor-core prefill launch as a macro over the kernel's buffers (pasted into the calling PrimFunc).
    `paged`: keys and values come from the page pool (`kv_a` = `kv_b` = pages, `kv_indptr` = page_indptr, with
    `page_values` and `length_info`); else from ragged k and v (`kv_a`, `kv_b` [total, h_kv, d], `kv_indptr`)."""
    group = h_q // h_kv
    lay = AttnLayout

    def page_row(page_values, page_begin, kv_len, key, kv: int, by):
        """Element offset of key `key` (clamped to the sequence's last key) of KV head `by` in the page pool (K: kv
        0, V: kv 1); int64, as the pool may pass 2^31 elements."""
        return ((T.Cast("int64", page_values[page_begin + T.min(key, kv_len - 1) // PAGE_SIZE]) * 2 + kv) * h_kv
                + by) * (PAGE_SIZE * HEAD_DIM) + T.min(key, kv_len - 1) % PAGE_SIZE * HEAD_DIM

    def seq_kv_len(kv_indptr, length_info, b):
        """Keys of sequence b: its pages (the last one `length_info[b]` full), or its ragged rows."""
        if paged:
            return T.if_then_else(kv_indptr[b + 1] != kv_indptr[b],
                                  (kv_indptr[b + 1] - kv_indptr[b] - 1) * PAGE_SIZE + length_info[b], 0)
        return kv_indptr[b + 1] - kv_indptr[b]

    def ragged_row(kv_begin, kv_len, key, by):
        """Element offset of key `key` (clamped to the sequence's last key) of KV head `by` in ragged k or v."""
        return ((kv_begin + T.min(key, kv_len - 1)) * h_kv + by) * HEAD_DIM

    @T.macro
    def load_kv(smem, kv_a, kv_b, page_values, kv_begin, kv_len, kv_start, buf, by, tid):
        """cp.async of keys kv_start .. kv_start + 63 (clamped to the last key) of KV head `by`: K and V rows."""
        for it in T.unroll(KEYS * CHUNKS // THREADS):
            if paged:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(smem[lay.k_slot(buf, it * (THREADS // CHUNKS) + tid // CHUNKS, tid % CHUNKS)]),
                    kv_a.access_ptr("r", offset=page_row(page_values, kv_begin, kv_len,
                                                         kv_start + it * (THREADS // CHUNKS) + tid // CHUNKS, 0, by)
                                    + tid % CHUNKS * 8),
                    16))
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(smem[lay.v_slot(buf, it * (THREADS // CHUNKS) + tid // CHUNKS, tid % CHUNKS)]),
                    kv_b.access_ptr("r", offset=page_row(page_values, kv_begin, kv_len,
                                                         kv_start + it * (THREADS // CHUNKS) + tid // CHUNKS, 1, by)
                                    + tid % CHUNKS * 8),
                    16))
            else:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(smem[lay.k_slot(buf, it * (THREADS // CHUNKS) + tid // CHUNKS, tid % CHUNKS)]),
                    kv_a.access_ptr("r", offset=ragged_row(kv_begin, kv_len,
                                                           kv_start + it * (THREADS // CHUNKS) + tid // CHUNKS, by)
                                    + tid % CHUNKS * 8),
                    16))
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(smem[lay.v_slot(buf, it * (THREADS // CHUNKS) + tid // CHUNKS, tid % CHUNKS)]),
                    kv_b.access_ptr("r", offset=ragged_row(kv_begin, kv_len,
                                                           kv_start + it * (THREADS // CHUNKS) + tid // CHUNKS, by)
                                    + tid % CHUNKS * 8),
                    16))

    @T.macro
    def tc_prefill(q, q_indptr, kv_a, kv_b, kv_indptr, page_values, length_info, output, lse, causal, sm_scale,
                   total_len, batch_size):
        bx = T.launch_thread("blockIdx.x", max_tiles(total_len, batch_size, group))
        by = T.launch_thread("blockIdx.y", h_kv)
        tx = T.launch_thread("threadIdx.x", 32)
        ty = T.launch_thread("threadIdx.y", WARPS)
        smem = T.alloc_buffer((SMEM_HALVES,), dtype, scope="shared.dyn")
        walk = T.alloc_buffer((3,), "int32", scope="local")  # tiles left, chosen sequence, its tile
        qa = T.alloc_buffer((HEAD_DIM // 16 * 8,), dtype, scope="local")  # Q A fragments, all k16 steps
        pa = T.alloc_buffer((KEYS // 16 * 8,), dtype, scope="local")  # P A fragments
        fb = T.alloc_buffer((8,), dtype, scope="local")  # two B fragments (one ldmatrix.x4)
        s_acc = T.alloc_buffer((S_TILES * 4,), "float32", scope="local")
        o_acc = T.alloc_buffer((O_TILES * 4,), "float32", scope="local")
        m_run = T.alloc_buffer((2,), "float32", scope="local")  # running max of rows g, g + 8
        l_run = T.alloc_buffer((2,), "float32", scope="local")  # this lane's part of the running sum
        m_new = T.alloc_buffer((2,), "float32", scope="local")
        alpha = T.alloc_buffer((2,), "float32", scope="local")
        tid = ty * 32 + tx
        # the CTA's (sequence, query tile): walk the sequences' tile counts, last tiles first (under a causal mask
        # they see the most keys, so the longest CTAs start first)
        walk[0] = max_tiles(total_len, batch_size, group) - 1 - bx
        walk[1] = -1
        walk[2] = 0
        for b in range(batch_size):
            if walk[1] < 0:
                if walk[0] < T.ceildiv((q_indptr[b + 1] - q_indptr[b]) * group, ROWS):
                    walk[1] = b
                    walk[2] = walk[0]
                walk[0] = walk[0] - T.ceildiv((q_indptr[b + 1] - q_indptr[b]) * group, ROWS)
        if T.tvm_thread_invariant(walk[1] >= 0):
            b_idx: T.let[T.int32] = walk[1]
            row0: T.let[T.int32] = walk[2] * ROWS
            qo_start: T.let[T.int32] = q_indptr[b_idx]
            qo_len: T.let[T.int32] = q_indptr[b_idx + 1] - q_indptr[b_idx]
            kv_begin: T.let[T.int32] = kv_indptr[b_idx]
            kv_len: T.let[T.int32] = seq_kv_len(kv_indptr, length_info, b_idx)
            # keys any row of the tile sees (causal: up to its last token's diagonal)
            kv_seen: T.let[T.int32] = T.if_then_else(
                causal > 0,
                T.max(T.min(kv_len, kv_len - qo_len + T.min((row0 + ROWS - 1) // group, qo_len - 1) + 1), 0),
                kv_len)
            kv_tiles: T.let[T.int32] = T.ceildiv(kv_seen, KEYS)
            scale: T.let[T.float32] = sm_scale * T.float32(LOG2E)
            # Q rows (clamped to the sequence's last token: padding rows are computed, never stored)
            for it in T.unroll(ROWS * CHUNKS // THREADS):
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(smem[lay.q_slot(it * (THREADS // CHUNKS) + tid // CHUNKS, tid % CHUNKS)]),
                    q.access_ptr("r", offset=(
                        (qo_start + T.min((row0 + it * (THREADS // CHUNKS) + tid // CHUNKS) // group, qo_len - 1))
                        * h_q + by * group + (row0 + it * (THREADS // CHUNKS) + tid // CHUNKS) % group)
                        * HEAD_DIM + tid % CHUNKS * 8),
                    16))
            T.evaluate(T.ptx["cp.async.commit_group"]())
            if kv_tiles > 0:
                load_kv(smem, kv_a, kv_b, page_values, kv_begin, kv_len, 0, 0, by, tid)
            T.evaluate(T.ptx["cp.async.commit_group"]())
            T.evaluate(T.ptx["cp.async.wait_group"](1))
            T.tvm_storage_sync("shared")
            for kk in T.unroll(HEAD_DIM // 16):
                T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", qa.data, kk * 8, smem.access_ptr("r"),
                                                 lay.q_frag(ty, kk, tx), dtype=dtype))
            for r in T.unroll(2):
                m_run[r] = T.float32(MASKED)
                l_run[r] = T.float32(0)
            for a in T.unroll(O_TILES * 4):
                o_acc[a] = T.float32(0)
            for t in range(kv_tiles):
                T.evaluate(T.ptx["cp.async.wait_group"](0))
                T.tvm_storage_sync("shared")
                # tile t + 1 in flight while tile t is multiplied (its buffer was last read in step t - 1)
                if t + 1 < kv_tiles:
                    load_kv(smem, kv_a, kv_b, page_values, kv_begin, kv_len, (t + 1) * KEYS, (t + 1) % 2, by, tid)
                T.evaluate(T.ptx["cp.async.commit_group"]())
                # S = Q K^T
                for a in T.unroll(S_TILES * 4):
                    s_acc[a] = T.float32(0)
                for kk in T.unroll(HEAD_DIM // 16):
                    for j in T.unroll(S_TILES // 2):
                        T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", fb.data, 0, smem.access_ptr("r"),
                                                         lay.k_frag(t % 2, j, kk, tx), dtype=dtype))
                        for h in T.unroll(2):
                            T.evaluate(T.ptx_legacy.mma(
                                "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                qa.data, kk * 8, fb.data, h * 4, s_acc.data, (2 * j + h) * 4, False,
                                dtype="float32"))
                # mask, scale to log2 units, new running max (quad of lanes = one row)
                for r in T.unroll(2):
                    m_new[r] = m_run[r]
                # a tile every row sees whole (below the first token's diagonal) needs no mask
                if (t + 1) * KEYS <= T.if_then_else(causal > 0, kv_len - qo_len + row0 // group + 1, kv_len):
                    for a in T.unroll(S_TILES * 4):
                        s_acc[a] = s_acc[a] * scale
                        m_new[a % 4 // 2] = T.max(m_new[a % 4 // 2], s_acc[a])
                else:
                    for j in T.unroll(S_TILES):
                        for c in T.unroll(4):
                            s_acc[j * 4 + c] = T.if_then_else(
                                t * KEYS + lay.acc_col(j, tx, c) < T.if_then_else(
                                    causal > 0,
                                    kv_len - qo_len + (row0 + lay.acc_row(ty, tx, c)) // group + 1,
                                    kv_len),
                                s_acc[j * 4 + c] * scale, T.float32(MASKED))
                            m_new[c // 2] = T.max(m_new[c // 2], s_acc[j * 4 + c])
                for r in T.unroll(2):
                    for sh in T.unroll(2):
                        m_new[r] = T.max(m_new[r], T.tvm_warp_shuffle_xor(
                            T.tvm_warp_activemask(), m_new[r], 1 << sh, 32, 32))
                    alpha[r] = T.exp2(m_run[r] - m_new[r])
                    m_run[r] = m_new[r]
                    l_run[r] = l_run[r] * alpha[r]
                # P = 2^(S - m), packed as fp16 A fragments (n-tiles 2k, 2k + 1 are k16 step k)
                for a in T.unroll(S_TILES * 4):
                    s_acc[a] = T.exp2(s_acc[a] - m_run[a % 4 // 2])
                    l_run[a % 4 // 2] = l_run[a % 4 // 2] + s_acc[a]
                    pa[a] = T.Cast(dtype, s_acc[a])
                for a in T.unroll(O_TILES * 4):
                    o_acc[a] = o_acc[a] * alpha[a % 4 // 2]
                # O += P V
                for kk in T.unroll(KEYS // 16):
                    for dj in T.unroll(O_TILES // 2):
                        T.evaluate(T.ptx_legacy.ldmatrix(True, 4, ".b16", fb.data, 0, smem.access_ptr("r"),
                                                         lay.v_frag(t % 2, kk, dj, tx), dtype=dtype))
                        for h in T.unroll(2):
                            T.evaluate(T.ptx_legacy.mma(
                                "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                pa.data, kk * 8, fb.data, h * 4, o_acc.data, (2 * dj + h) * 4, False,
                                dtype="float32"))
            T.evaluate(T.ptx["cp.async.wait_group"](0))
            # the row sums over the quad; O / l and lse = m + log2(l)
            for r in T.unroll(2):
                for sh in T.unroll(2):
                    l_run[r] = l_run[r] + T.tvm_warp_shuffle_xor(
                        T.tvm_warp_activemask(), l_run[r], 1 << sh, 32, 32)
            for c in T.unroll(4):
                if (row0 + lay.acc_row(ty, tx, c)) // group < qo_len:
                    for j in T.unroll(O_TILES):
                        output[qo_start + (row0 + lay.acc_row(ty, tx, c)) // group,
                               by * group + (row0 + lay.acc_row(ty, tx, c)) % group,
                               lay.acc_col(j, tx, c)] = T.Cast(dtype, T.if_then_else(
                                   l_run[c // 2] > T.float32(0), o_acc[j * 4 + c] / l_run[c // 2], T.float32(0)))
                    if tx % 4 == 0 and c % 2 == 0:
                        lse[qo_start + (row0 + lay.acc_row(ty, tx, c)) // group,
                            by * group + (row0 + lay.acc_row(ty, tx, c)) % group] = T.if_then_else(
                                l_run[c // 2] > T.float32(0), m_run[c // 2] + T.log2(l_run[c // 2]),
                                T.float32(MASKED))

    return tc_prefill


TVM_RAGGED_SYMBOL = "batch_prefill_ragged_kv"  # TIRPagedKVCache's prefill kernel over the chunk's own keys
RAGGED_SYMBOL = "batch_prefill_ragged_kv_tc"


def ragged_prefill_tc(h_kv: int, h_q: int, d: int, dtype: str) -> tirx.PrimFunc:
    """`batch_prefill_ragged_kv` (TVM 0.27's signature: every sequence's queries over its own ragged keys, causal or
    not) on the tensor-core kernel, for every chunk length. As in the paged kernel RoPE is never applied here
    (`rotary_mode` is 0 for our decoders, which rotate q and k before the cache)."""
    if not tc_supported(h_kv, h_q, d, dtype, PAGE_SIZE):
        raise ValueError(f"no tensor-core ragged prefill for h_kv={h_kv} h_q={h_q} d={d} {dtype}")
    tc_prefill = make_tc_prefill(h_kv, h_q, dtype, paged=False)

    @T.prim_func
    def batch_prefill_ragged_kv_tc(
        var_q: T.handle,  # [qo_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_k: T.handle,  # [kv_len, h_kv, d]
        var_v: T.handle,  # [kv_len, h_kv, d]
        var_kv_indptr: T.handle,  # [batch_size + 1]
        var_q_rope_position: T.handle,  # [qo_len]
        var_k_rope_pos_offset: T.handle,  # [batch_size]
        var_output: T.handle,  # [qo_len, h_q, d]
        var_lse: T.handle,  # [qo_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"global_symbol": RAGGED_SYMBOL, "tirx.is_scheduled": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        # the rope positions are part of the signature; q and k arrive rotated (see the docstring)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        tc_prefill(q, q_indptr, k, v, kv_indptr, None, None, output, lse, causal, sm_scale, qo_len, batch_size)

    return batch_prefill_ragged_kv_tc
