"""The tensor-core paged prefill attention (tir_kernels/cuda_attention_mma.py): its data movement emulated in numpy
with the PTX ISA's ldmatrix / mma.sync fragment layouts gives float64 attention (every row), and the generated CUDA
is tensor-core code. The GPU check is bench/attention_prefill.py (tests/gpu/test_attention_split_kv_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_aot import require_cuda_toolkit
from test_dense_mma import _ldmatrix_x4, _mma_m16n8k16

tvm = pytest.importorskip("tvm")

PAGE = 16
D = 128


def _ldmatrix_x4_trans(smem, addr):
    """`ldmatrix...x4.trans.b16`: lanes 8m..8m+7 give the rows of matrix m; lane t receives elements (2(t%4), t/4)
    and (2(t%4)+1, t/4) of each matrix m (the transpose of the plain load)."""
    lane = np.arange(32)
    rows = smem[addr[:, None] + np.arange(8)]  # (32 addresses, 8 halves)
    out = np.empty((32, 8), smem.dtype)
    for m in range(4):
        for h in range(2):
            out[:, 2 * m + h] = rows[8 * m + 2 * (lane % 4) + h, lane // 4]
    return out


def _emulate(q, q_indptr, pages, page_indptr, page_values, last_len, causal, sm_scale, h_kv, h_q, ragged=None):
    """Every CTA of the kernel, as it moves data: (output fp16, lse). `ragged` = (k, v, kv_indptr): the ragged
    kernel's keys instead of the pages."""
    from vptq_mlc.tir_kernels import cuda_attention_mma as am

    lay = am.AttnLayout
    group = h_q // h_kv
    total, batch = q.shape[0], len(q_indptr) - 1
    out = np.zeros((total, h_q, D), np.float16)
    lse = np.zeros((total, h_q), np.float32)
    qf, pf = q.reshape(-1), pages.reshape(-1)
    lane = np.arange(32)
    tid = np.arange(am.THREADS)
    grid = -(-total * group // am.ROWS) + batch - 1
    for bx in range(grid):
        left, b_sel, t_sel = grid - 1 - bx, -1, 0
        for b in range(batch):
            if b_sel < 0:
                n = -(-(q_indptr[b + 1] - q_indptr[b]) * group // am.ROWS)
                if left < n:
                    b_sel, t_sel = b, left
                left -= n
        if b_sel < 0:
            continue
        row0, qo_start = t_sel * am.ROWS, q_indptr[b_sel]
        qo_len = q_indptr[b_sel + 1] - qo_start
        if ragged is None:
            p0 = page_indptr[b_sel]
            kv_len = (page_indptr[b_sel + 1] - p0 - 1) * PAGE + last_len[b_sel] if page_indptr[b_sel + 1] != p0 else 0
        else:
            p0 = ragged[2][b_sel]
            kv_len = ragged[2][b_sel + 1] - p0
        last_tok = min((row0 + am.ROWS - 1) // group, qo_len - 1)
        kv_seen = max(min(kv_len, kv_len - qo_len + last_tok + 1), 0) if causal else kv_len
        for by in range(h_kv):
            smem = np.zeros(am.SMEM_HALVES, np.float16)

            def copy16(dst, src_flat, src):
                for i in range(len(dst)):
                    smem[dst[i]: dst[i] + 8] = src_flat[src[i]: src[i] + 8]

            def load_kv(kv_start, buf):
                for it in range(am.KEYS * am.CHUNKS // am.THREADS):
                    row = it * (am.THREADS // am.CHUNKS) + tid // am.CHUNKS
                    key = np.minimum(kv_start + row, kv_len - 1)
                    for kv, slot in ((0, lay.k_slot), (1, lay.v_slot)):
                        if ragged is None:
                            src = (((page_values[p0 + key // PAGE].astype(np.int64) * 2 + kv) * h_kv + by) * PAGE * D
                                   + key % PAGE * D + tid % am.CHUNKS * 8)
                            copy16(slot(buf, row, tid % am.CHUNKS), pf, src)
                        else:
                            src = ((p0 + key) * h_kv + by) * D + tid % am.CHUNKS * 8
                            copy16(slot(buf, row, tid % am.CHUNKS), ragged[kv].reshape(-1), src)

            for it in range(am.ROWS * am.CHUNKS // am.THREADS):
                row = it * (am.THREADS // am.CHUNKS) + tid // am.CHUNKS
                src = (((qo_start + np.minimum((row0 + row) // group, qo_len - 1)) * h_q + by * group
                        + (row0 + row) % group) * D + tid % am.CHUNKS * 8)
                copy16(lay.q_slot(row, tid % am.CHUNKS), qf, src)
            tiles = -(-kv_seen // am.KEYS)
            if tiles > 0:
                load_kv(0, 0)
            smem_tiles = [smem.copy()]
            for t in range(1, tiles):  # the double buffer as the kernel fills it, tile by tile
                load_kv(t * am.KEYS, t % 2)
                smem_tiles.append(smem.copy())
            for warp in range(am.WARPS):
                qa = [_ldmatrix_x4(smem_tiles[0], lay.q_frag(warp, kk, lane)) for kk in range(D // 16)]
                m_run = np.full((32, 2), am.MASKED, np.float32)
                l_run = np.zeros((32, 2), np.float32)
                o_acc = np.zeros((32, am.O_TILES, 4), np.float32)
                for t in range(tiles):
                    sm = smem_tiles[t]
                    s = np.zeros((32, am.S_TILES, 4), np.float32)
                    for kk in range(D // 16):
                        for j in range(am.S_TILES // 2):
                            fb = _ldmatrix_x4(sm, lay.k_frag(t % 2, j, kk, lane))
                            for h in range(2):
                                s[:, 2 * j + h] = _mma_m16n8k16(qa[kk], fb[:, 4 * h: 4 * h + 4], s[:, 2 * j + h])
                    m_new = m_run.copy()
                    # the kernel skips the mask on tiles whole to every row: they must be
                    unmasked = (t + 1) * am.KEYS <= (kv_len - qo_len + row0 // group + 1 if causal else kv_len)
                    for j in range(am.S_TILES):
                        for c in range(4):
                            key = t * am.KEYS + lay.acc_col(j, lane, c)
                            tok = (row0 + lay.acc_row(warp, lane, c)) // group
                            limit = kv_len - qo_len + tok + 1 if causal else kv_len
                            assert not unmasked or (key < limit).all()
                            s[:, j, c] = np.where(key < limit, s[:, j, c] * np.float32(sm_scale * am.LOG2E),
                                                  np.float32(am.MASKED))
                            m_new[:, c // 2] = np.maximum(m_new[:, c // 2], s[:, j, c])
                    for sh in (1, 2):
                        m_new = np.maximum(m_new, m_new[lane ^ sh])
                    alpha = np.exp2(m_run - m_new)
                    m_run = m_new
                    l_run = l_run * alpha
                    for c in range(4):
                        s[:, :, c] = np.exp2(s[:, :, c] - m_run[:, c // 2, None])
                        l_run[:, c // 2] += s[:, :, c].sum(axis=1)
                        o_acc[:, :, c] *= alpha[:, c // 2, None]
                    pa = s.reshape(32, -1).astype(np.float16)  # accumulator a is A-fragment element a
                    for kk in range(am.KEYS // 16):
                        for dj in range(am.O_TILES // 2):
                            fb = _ldmatrix_x4_trans(sm, lay.v_frag(t % 2, kk, dj, lane))
                            for h in range(2):
                                o_acc[:, 2 * dj + h] = _mma_m16n8k16(pa[:, kk * 8: kk * 8 + 8], fb[:, 4 * h: 4 * h + 4],
                                                                     o_acc[:, 2 * dj + h])
                for sh in (1, 2):
                    l_run = l_run + l_run[lane ^ sh]
                for c in range(4):
                    rows = row0 + lay.acc_row(warp, lane, c)
                    for ln in range(32):
                        tok = rows[ln] // group
                        if tok >= qo_len:
                            continue
                        head = by * group + rows[ln] % group
                        lv = l_run[ln, c // 2]
                        for j in range(am.O_TILES):
                            out[qo_start + tok, head, lay.acc_col(j, ln, c)] = o_acc[ln, j, c] / lv if lv > 0 else 0
                        lse[qo_start + tok, head] = m_run[ln, c // 2] + np.log2(lv) if lv > 0 else am.MASKED
    return out, lse


def _reference(q, q_indptr, k, v, q_lens, kv_lens, causal, sm_scale, group):
    """float64 attention of each new token over its sequence's keys: (output, lse in log2 units, visible rows)."""
    out, lse = np.zeros(q.shape), np.zeros(q.shape[:2])
    valid = np.zeros(q.shape[:2], bool)
    for b, (qo, kv) in enumerate(zip(q_lens, kv_lens)):
        for i in range(qo):
            limit = kv - qo + i + 1 if causal else kv
            if limit <= 0:
                continue
            for h in range(q.shape[1]):
                s = k[b][:limit, h // group] @ q[q_indptr[b] + i, h].astype(np.float64) * sm_scale
                p = np.exp(s - s.max())
                out[q_indptr[b] + i, h] = p @ v[b][:limit, h // group] / p.sum()
                lse[q_indptr[b] + i, h] = (s.max() + np.log(p.sum())) / np.log(2)
                valid[q_indptr[b] + i, h] = True
    return out, lse, valid


@pytest.mark.parametrize("h_kv,h_q,q_lens,kv_lens,causal,ragged", [
    (1, 4, (70,), (130,), 1, False),  # two query tiles, three KV tiles (the last partial), causal diagonal
    (2, 2, (65, 3), (0, 100), 0, False),  # a sequence with no cached key, a partial tile
    (1, 8, (9,), (200,), 0, False),  # group 8: one tile of 9 tokens x 8 heads
    (1, 4, (40, 90), (40, 90), 1, True),  # the ragged kernel: two sequences over themselves, causal
])
def test_emulated_kernel_computes_attention(h_kv, h_q, q_lens, kv_lens, causal, ragged):
    rng = np.random.default_rng(1)
    group = h_q // h_kv
    n_pages = [-(-kv // PAGE) for kv in kv_lens]
    pool = sum(n_pages) + 2
    page_values = rng.permutation(pool)[: sum(n_pages)].astype(np.int32)
    page_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([kv - (n - 1) * PAGE if n else 0 for kv, n in zip(kv_lens, n_pages)], np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(q_indptr[-1]), h_q, D)).astype(np.float16)
    pages = rng.standard_normal((pool, 2, h_kv, PAGE, D)).astype(np.float16)
    sm_scale = D ** -0.5
    ks, vs = [], []
    for b, kv in enumerate(kv_lens):
        idx = np.arange(kv)
        pg = page_values[page_indptr[b]: page_indptr[b + 1]]
        ks.append(pages[pg[idx // PAGE], 0, :, idx % PAGE].astype(np.float64))
        vs.append(pages[pg[idx // PAGE], 1, :, idx % PAGE].astype(np.float64))
    rag = None
    if ragged:  # the same keys, each sequence's in a row
        rag = (np.concatenate(ks).astype(np.float16), np.concatenate(vs).astype(np.float16),
               np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32))
    got_o, got_lse = _emulate(q, q_indptr, pages, page_indptr, page_values, last, causal, sm_scale, h_kv, h_q, rag)
    ref_o, ref_lse, valid = _reference(q, q_indptr, ks, vs, q_lens, kv_lens, causal, sm_scale, group)
    err = np.linalg.norm(got_o - ref_o, axis=-1) / np.maximum(np.linalg.norm(ref_o, axis=-1), 1e-6)
    assert valid.any() and err[valid].max() <= 2e-3, err[valid].max()
    assert np.abs(got_lse - ref_lse)[valid].max() <= 2e-3
    # rows that see no key: output 0 and lse -5e4, the state TVM's kernel leaves (weighs nothing in a merge)
    assert (got_o[~valid] == 0).all() and (got_lse[~valid] == -5e4).all()


def test_long_chunk_kernel_is_tensor_core_code():
    require_cuda_toolkit(cuobjdump=False)
    from cuda_sources import generated_cuda, kernel_definitions

    from vptq_mlc.tir_kernels.cuda_attention_split_kv import paged_prefill_split_kv

    func = paged_prefill_split_kv(2, 8, D, "float16", PAGE, tensor_cores=True).with_attr("global_symbol", "attn")
    src = generated_cuda(lambda bt: tvm.compile(tvm.IRModule({"attn": func}), target=bt.target), "sm_90")
    kernels = kernel_definitions(src)
    assert len(kernels) == 1  # the tensor-core kernel alone: no tile loop, no merge, for every chunk length
    tc = [code for code in kernels.values() if "mma.sync" in code]
    assert len(tc) == 1
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in tc[0] and "cp_async_cg" in tc[0]
    # other head widths keep the CUDA-core kernels only
    narrow = paged_prefill_split_kv(2, 8, 64, "float16", PAGE, tensor_cores=True).with_attr("global_symbol", "a")
    src = generated_cuda(lambda bt: tvm.compile(tvm.IRModule({"a": narrow}), target=bt.target), "sm_90")
    assert "mma.sync" not in src and len(kernel_definitions(src)) == 2


def test_cache_with_heads_of_128_compiles_through_the_cuda_pipeline():
    """A paged KV cache of fp16 heads of 128 through the CUDA backend's whole pipeline: the library has the
    tensor-core paged and ragged kernels (the paged function has no tile loop or merge left) next to TVM's other
    attention kernels."""
    require_cuda_toolkit(cuobjdump=False)
    from cuda_sources import generated_cuda, kernel_definitions
    from test_attention_split_kv import _cache_module

    src = generated_cuda(lambda bt: tvm.compile(_cache_module(2, 8, D), target=bt.target,
                                                relax_pipeline=bt.relax_pipeline()), "sm_90")
    kernels = kernel_definitions(src)
    for name in ("batch_prefill_paged_kv_split_kernel", "batch_prefill_ragged_kv_tc_kernel"):
        assert "mma.sync" in kernels[name], name
    assert "batch_prefill_paged_kv_split_kernel_1" not in kernels and "batch_prefill_ragged_kv_kernel" not in kernels
