"""GPU kernel for gathered experts: every (activation row, selected slot) pair multiplies its row by the VQ matrix
the router picked for it, all pairs in one launch (a mixture-of-experts layer's selected experts, stacked as in
artifact/expert_stack.py: matrix m's groups are codebook rows m*G.., its vector rows code rows m*N..).

`y[b, s, :] = W[mat[b, s]] @ xs[b, s, :]` for xs [n, S, I], mat [n, S] int32, y [n, S, O]; n may be symbolic (decode
batches and prefill chunks alike run it: a token reads only its k experts' codes, against every expert for a dense
mixture, E / k times the bytes).

Schedule: the decode GEMV's (cuda_gemv.py, one activation row) with the pair on blockIdx.x and the CTA's block of R
vector rows on blockIdx.y: P input splits per vector row (one warp each), VW codes per lane load, U chunks in flight,
fp32 accumulators, warp shuffles then shared memory for the split reduction. Codebooks are read through L1/L2
(`load_book_entry`), never copied to shared memory: a CTA serves one row of one matrix, so a copy of the whole book
would cost more than the lookups it serves.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.vq_layout import code_dtype
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, fma_entry, keep_params, load_book_entry, vr, warp_sum
from vptq_mlc.tir_kernels.cuda_gemv import CUDA_PARAMS, GpuParams, plan_gemv
from vptq_mlc.tir_kernels.generic import kernel_dims


def vq_gathered_cuda(cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int, rows: int | None = None,
                     params: GpuParams = CUDA_PARAMS) -> tirx.PrimFunc:
    """PrimFunc(xs[n, slots, I], mat[n, slots] int32, *stacked operands, y[n, slots, O]); `rows` None: n symbolic."""
    p = plan_gemv(cfg, 1, dtype, params)
    WARP, SCOPE = params.warp_size, params.shared_scope
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    M, SL = matrices, slots
    NB = tirx.Var("n", "int64") if rows is None else rows
    PAIRS = T.Cast("int32", NB) * SL if rows is None else rows * SL
    R, P, VW, U, EV = p.rows_per_cta, p.splits, p.vec, p.unroll, p.entry_vec
    W = R * P
    NT = W * WARP
    NRB = -(-NV // R)  # row blocks
    NCH = -(-L // VW)  # chunks of VW codes
    CPS = -(-NCH // P)  # chunks per split
    ITERS = -(-CPS // (WARP * U))
    CD, RCD = code_dtype(K), code_dtype(KR1)
    OPW = -(-OSZ1 // P)  # outlier columns per split
    OITERS = -(-OPW // WARP)
    ACC = "float32"
    # element offsets into a stack pass 2^31 for large ones (offsets are matrix * per-matrix size + within)
    IDX = "int64" if M * max(NV * L, G * K * v, G * KR1 * v, KO * VO, NO * OSZ1) >= 1 << 31 else "int32"

    @T.prim_func(private=True)
    def kernel(
        xs: T.Buffer((NB, SL, I), dtype),
        mat: T.Buffer((NB, SL), "int32"),
        centroids: T.Buffer((M * G, K, v), dtype),
        codes: T.Buffer((M * NV, L), CD),
        res_centroids: T.Buffer((M * G, KR1, v), dtype),
        res_codes: T.Buffer((M * NV, L), RCD),
        outlier_centroids: T.Buffer((M * KO, VO), dtype),
        outlier_codes: T.Buffer((M * NO, OSZ1), "uint16"),
        y: T.Buffer((NB, SL, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        bx = T.launch_thread("blockIdx.x", PAIRS)
        by = T.launch_thread("blockIdx.y", NRB)
        tx = T.launch_thread("threadIdx.x", WARP)
        ty = T.launch_thread("threadIdx.y", W)
        red = T.alloc_buffer((W * v,), ACC, scope=SCOPE)
        acc = T.alloc_buffer((v,), ACC, scope="local")
        cl = T.alloc_buffer((U * VW,), CD, scope="local")
        rl = T.alloc_buffer((U * VW,), RCD, scope="local")
        xl = T.alloc_buffer((U * VW,), dtype, scope="local")
        wl = T.alloc_buffer((v,), dtype, scope="local")
        wr = T.alloc_buffer((v,), dtype, scope="local")
        mi = T.alloc_buffer((1,), IDX, scope="local")
        tot = T.alloc_buffer((1,), ACC, scope="local")
        tid = ty * WARP + tx
        rr = ty // P
        sp = ty % P
        i = by * R + rr
        mi[0] = T.Cast(IDX, mat[bx // SL, bx % SL])
        for a in T.unroll(v):
            acc[a] = T.float32(0)
        if i < NV:
            for it in range(ITERS):
                # issue U chunk loads (codes + activations) before any lookup
                for u in T.unroll(U):
                    c = sp * CPS + (it * U + u) * WARP + tx
                    if c < T.min((sp + 1) * CPS, NCH):
                        cl[vr(u * VW, VW)] = codes[mi[0] * NV + T.Cast(IDX, i), vr(c * VW, VW)]
                        if HAS_RES:
                            rl[vr(u * VW, VW)] = res_codes[mi[0] * NV + T.Cast(IDX, i), vr(c * VW, VW)]
                        xl[vr(u * VW, VW)] = xs[bx // SL, bx % SL, vr(OSZ + c * VW, VW)]
                for u in T.unroll(U):
                    c = sp * CPS + (it * U + u) * WARP + tx
                    if c < T.min((sp + 1) * CPS, NCH):
                        for e in T.unroll(VW):
                            g = mi[0] * G + T.Cast(IDX, (c * VW + e) // S)
                            load_book_entry(wl, centroids, g, T.Cast("int32", cl[u * VW + e]), v, EV)
                            xv = T.Cast(ACC, xl[u * VW + e])
                            if HAS_RES:
                                load_book_entry(wr, res_centroids, g, T.Cast("int32", rl[u * VW + e]), v, EV)
                                for j in T.unroll(v):
                                    acc[j] = acc[j] + xv * (T.Cast(ACC, wl[j]) + T.Cast(ACC, wr[j]))
                            else:
                                fma_entry(acc, 0, v, xv, wl)
            if HAS_OUT:
                for oit in range(OITERS):
                    ko = sp * OPW + oit * WARP + tx
                    if ko < T.min((sp + 1) * OPW, OSZ):
                        for j in T.unroll(v):
                            r = i * v + j
                            if r < O:
                                oc = T.Cast(IDX, outlier_codes[mi[0] * NO + T.Cast(IDX, r // VO), ko])
                                wo = T.Cast(ACC, outlier_centroids[mi[0] * KO + oc, r % VO])
                                acc[j] = acc[j] + T.Cast(ACC, xs[bx // SL, bx % SL, ko]) * wo
        # lanes -> lane 0 (warp shuffles), then splits -> one thread per output (shared memory)
        warp_sum(acc, v, WARP, WARP)
        if tx == 0:
            for a in T.unroll(v):
                red[ty * v + a] = acc[a]
        T.tvm_storage_sync("shared")
        for oit in range(-(-(R * v) // NT)):
            o = oit * NT + tid
            if o < R * v:
                oi = by * R + o // v
                r = oi * v + o % v
                if oi < NV and r < O:
                    tot[0] = T.float32(0)
                    for q in T.unroll(P):
                        tot[0] = tot[0] + red[((o // v) * P + q) * v + o % v]
                    y[bx // SL, bx % SL, r] = T.Cast(dtype, tot[0])

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    return keep_params(kernel, {"xs", "mat", "y", *vq_operand_shapes(cfg)})
