"""CUDA VQ kernel on tensor cores (m16n8k16, fp16 in, fp32 acc): decode for 4..16 activation rows, and prefill
for a symbolic row count (a grid row per `16 * row_tiles` rows; each B fragment feeds `row_tiles` MMAs).

Why: at batch >= 4 the gather GEMV (`cuda_gemv.py`) is bound by its fp32 FMAs (rows x v per code per lane) and
register pressure (rows x v accumulators), not by memory; docs/vq-gemv-h100.md §3 measured gather
kernels losing to fp16 from batch 4. Here one warp-wide `mma.sync.m16n8k16` does 16 rows x 8 outputs x 16
inputs, and the lookups build its B fragment directly, so the weight never exists outside registers.

Why lookups give the B fragment: with layout `generic`, `codes[i, k]` selects the entry `C[g, code]` holding the
`v` outputs `i*v .. i*v+v-1` at input column `k`, so `W^T[k, i*v + n] = C[g, codes[i, k], n]`. For the PTX
fragment of B (k x n, "col"), lane (group g = lane/4, q = lane%4) holds B[k][n = g] at k slots {2q, 2q+1, 2q+8,
2q+9}: four 2-byte lookups of element `g` of four entries. v = 8 fills one n-tile; v = 12/16 use two (zeros past v),
v = 4 half of one.

Column mapping: a sum over k does not care which physical column sits in which k slot, as long as A and B agree.
Lane q owns the `4*DS` consecutive physical columns `[base + 4*DS*q, +4*DS)` of each `16*DS`-column chunk and feeds
4 of them to each of the DS MMA steps: so codes and activations come in one 8- or 16-byte load per lane, and the
A fragment (activation rows g and g+8) is loaded once per chunk and reused by every vector row of the warp.

Measured on the H100 (bench/RESULTS.md "Tensor-core decode kernel", "Tensor-core prefill"): time flat from 4
to 16 rows (that makes batch 16 cheap), 8-12% of copy bandwidth; prefill 2.6-4.4x the dlight dequant matmul but
0.07-0.29x cuBLAS fp16 (one 2-byte shared-memory lookup per B element keeps it instruction-bound).

Schedule: a warp owns NI vector rows (NI * ceil(v/8) MMA tiles, 4 fp32 accumulators each) and one of P splits
of the input dimension; a CTA holds RW x P warps; splits are summed through shared memory. Small codebooks
(<= cuda_gemv.SMEM_CODEBOOK_BYTES) are copied to shared memory once per CTA, large ones are read through L1/L2
(each lookup now serves 16 rows). Outlier columns (their own codebook, vector length along the output) use
the same MMA with B built from the outlier codebook. Rows past the batch are zero in A and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.vq_layout import code_dtype
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, fill_book_direct, pow2_floor, vr
from vptq_mlc.tir_kernels.cuda_gemv import SMEM_CODEBOOK_BYTES, keep_generic_operands
from vptq_mlc.tir_kernels.generic import kernel_dims

MMA_ROWS = 16  # M of m16n8k16: the most activation rows one kernel takes
MIN_ROWS = 4  # the kernel handles 4..16 rows; below 4 the gather GEMV always wins
MMA_FROM_ROWS = 6  # where the registry prefers it (mma_preferred)
MAX_DYN_SMEM = 99 * 1024  # dynamic shared memory per block on sm_86/sm_89 (the smallest of the default archs)


@dataclass(frozen=True)
class MmaPlan:
    vec_rows: int  # NI: vector rows per warp
    row_groups: int  # RW: warps along rows in a CTA
    splits: int  # P: warps along the input dimension
    steps_per_load: int  # DS: MMA steps per 8*DS-byte code load (1 or 2)
    smem_codebook: bool
    unroll: int = 4  # U: chunks whose loads are in flight before the first lookup
    row_tiles: int = 1  # MB: 16-row MMA tiles per CTA (each B fragment feeds MB MMAs); decode: 1


def plan_mma(cfg: VPTQLayerConfig) -> MmaPlan:
    """Launch shape from the layer shape alone (compile time, no device queries). ~2-4k warps in the grid."""
    nv, length = cfg.num_vectors, cfg.group_num * cfg.group_size
    ds = 2 if length % 8 == 0 and cfg.outlier_size % 8 == 0 else 1
    vec_rows = 2
    warp_rows = -(-nv // vec_rows)
    splits = max(1, min(8, pow2_floor(4096 // max(1, warp_rows)), pow2_floor(max(1, length // (16 * ds * 8)))))
    row_groups = max(1, 8 // splits)
    cb = cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * 2
    chunks = -(-length // (16 * ds * splits))
    unroll = 4 if chunks >= 4 else 2 if chunks >= 2 else 1
    return MmaPlan(vec_rows, row_groups, splits, ds, cb <= SMEM_CODEBOOK_BYTES, unroll)


def mma_supported(cfg: VPTQLayerConfig, dtype: str, rows: int) -> bool:
    return dtype == "float16" and MIN_ROWS <= rows <= MMA_ROWS


def mma_preferred(cfg: VPTQLayerConfig, dtype: str, rows: int, gemv_max_rows: int) -> bool:
    """The tensor-core kernel or the gather GEMV (H100, bench/RESULTS.md "Tensor-core decode kernel"): the MMA
    kernel's time is flat in rows, the GEMV's grows ~linearly (v8-k4096-0 4096x4096: GEMV 14.6 / 24.2 us at 4 / 8
    rows, MMA 18 us), so MMA from ~6 rows; but every B element is its own 2-byte lookup, so a residual codebook
    (two lookups per element) or v > 8 (two n-tiles) keeps the GEMV up to its last row count."""
    if not mma_supported(cfg, dtype, rows):
        return False
    if rows > gemv_max_rows:
        return True
    return rows >= MMA_FROM_ROWS and not cfg.has_residual and cfg.vector_len <= 8


def plan_mma_prefill(cfg: VPTQLayerConfig) -> MmaPlan:
    """Prefill (symbolic rows) launch shape, from the H100 plan comparison (bench/RESULTS.md "Tensor-core
    prefill"; 128/512/2048 rows on 4096x4096, 11008x4096, 4096x11008); 4 row tiles of 16 per CTA, so each
    lookup-built B fragment feeds 4 MMAs (8 tiles was faster on 4096-row outputs but needs > 99 KB of shared
    memory next to a 64 KiB codebook with the split below, more than sm_86/sm_89 allow):
    - codebooks in shared memory without a residual: split the input dimension until the output alone gives
      ~2 CTAs per SM for a short prompt (one split left 4096-row outputs with 64 CTAs at 128 rows: 224 vs 81 us),
      two chunks in flight;
    - a residual codebook or one read through L1/L2 (K = 65536): one split, 8 warps along the output, one chunk in
      flight (the split plan was 1.3-2x slower there: more registers and global lookups per CTA)."""
    d = plan_mma(cfg)
    if not d.smem_codebook or cfg.has_residual:
        return MmaPlan(d.vec_rows, 8, 1, d.steps_per_load, d.smem_codebook, unroll=1, row_tiles=4)
    splits = 1
    while splits < 8 and -(-cfg.num_vectors // ((8 // (splits * 2)) * d.vec_rows)) <= 264:
        splits *= 2
    return MmaPlan(d.vec_rows, 8 // splits, splits, d.steps_per_load, d.smem_codebook, unroll=2, row_tiles=4)


def vq_mma_cuda(cfg: VPTQLayerConfig, dtype: str, rows: int | None, plan: MmaPlan | None = None) -> tirx.PrimFunc:
    """PrimFunc(xs[rows, I], *operands, y[rows, O]), fp16: decode for MIN_ROWS <= rows <= 16, or prefill for a
    symbolic row count (`rows=None`: a grid row per 16 * row_tiles rows)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)  # uint8 codes for books of <= 256 entries
    NB = rows if rows is not None else tirx.Var("n", "int64")
    mma = mma_macro(cfg, dtype, rows, NB, plan)

    @T.prim_func(private=True)
    def kernel(
        xs: T.Buffer((NB, I), dtype),
        centroids: T.Buffer((G, K, v), dtype),
        codes: T.Buffer((NV, L), CD),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        res_codes: T.Buffer((NV, L), RCD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        y: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        mma(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y)

    return keep_generic_operands(kernel, cfg)


def mma_macro(cfg: VPTQLayerConfig, dtype: str, rows: int | None, NB, plan: MmaPlan | None = None,  # noqa: N803
              add_dot: bool = False, add_bias: bool = False, y_col0: int = 0, add_residual: bool = False):
    """The kernel launch of `vq_mma_cuda` as a macro over (xs, centroids, codes, res_centroids, res_codes,
    outlier_centroids, outlier_codes, y) with `NB` rows (`rows`, or the caller's int64 row variable), so a caller
    can put it next to other kernels in one PrimFunc (`cuda_dequant_gemm.py`). `add_dot` / `add_bias`: the macro
    also takes dot[NB, 1] (fp32 norm-bias dot) / bias[O] and adds them to each output after its rounding, in the
    output dtype, as `VPTQLinear.finish` would (`y + dot.astype(dtype) + bias`: the same bits); `add_residual`:
    also res[NB, O], added last in the same way (as `residual + linear(x)`). `y_col0`: output column r goes to
    y[:, y_col0 + r] (y wider than O: several layers' outputs side by side)."""
    if rows is not None and not mma_supported(cfg, dtype, rows):
        raise ValueError(f"vq_mma_cuda takes fp16 and {MIN_ROWS}..{MMA_ROWS} rows, got {dtype} x {rows}")
    if dtype != "float16":
        raise ValueError(f"vq_mma_cuda takes fp16, got {dtype}")
    p = plan or (plan_mma(cfg) if rows is not None else plan_mma_prefill(cfg))
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    NI, RW, P, DS, U, MB = p.vec_rows, p.row_groups, p.splits, p.steps_per_load, p.unroll, p.row_tiles
    NTN = -(-v // 8)  # n-tiles per vector row
    NACC = MB * NI * NTN * 4  # fp32 accumulators per lane
    NBY = 1 if rows is not None and rows <= 16 * MB else (NB + 16 * MB - 1) // (16 * MB)  # grid rows
    W = RW * P
    NT = W * 32
    CW = 4 * DS  # columns per lane per chunk
    CHUNK = 16 * DS
    NCH = -(-L // CHUNK)
    CPS = -(-NCH // P)  # chunks per split
    NOCH = -(-OSZ // 16) if HAS_OUT else 0  # outlier MMA steps (scalar loads)
    NRB = -(-NV // (RW * NI))
    VEC = L % CW == 0 and OSZ % CW == 0  # (I = OSZ + L)  # a lane's CW columns are all valid or all invalid
    CB_MAIN = G * K * v
    CB_ALL = CB_MAIN + (G * KR * v if HAS_RES else 0)
    SMEM_CB = p.smem_codebook
    CB_SHARED = CB_ALL if SMEM_CB else 1
    RED = max(1, (P - 1) * RW * NACC * 32)
    smem = CB_SHARED * 2 + RED * 4
    if smem > MAX_DYN_SMEM:  # one library serves every default arch: sm_86/sm_89 allow 99 KB per block
        raise ValueError(f"MMA plan {p} needs {smem} bytes of shared memory (> {MAX_DYN_SMEM})")

    def col0(sp, ch, lane):  # first main column of this lane in chunk `ch` of split `sp`; an inline expression,
        return (sp * CPS + ch) * CHUNK + lane % 4 * CW  # not a bound variable, so the codegen sees the alignment

    def row(by, mb, lane, h):  # activation row of fragment half h (rows g / g + 8) in row tile mb of grid row by
        return (by * MB + mb) * 16 + lane // 4 + 8 * h

    def ai(mb, ii, nt):  # first of the 4 accumulators of (row tile, vector row, n-tile)
        return ((mb * NI + ii) * NTN + nt) * 4

    def out_col(r):  # y's column of output r (`y_col0`)
        return y_col0 + r if y_col0 else r

    def epilogue(val, dot, bias, res, b, r):  # what VPTQLinear.finish adds, in its order, then the residual
        if add_dot:
            val = val + T.Cast(dtype, dot[b, 0])
        if add_bias:
            val = val + bias[r]
        if add_residual:
            val = val + res[b, r]
        return val

    @T.macro
    def mma(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot=None,
            bias=None, res=None):
        bx = T.launch_thread("blockIdx.x", NRB)
        by = T.launch_thread("blockIdx.y", NBY)
        tx = T.launch_thread("threadIdx.x", 32)
        ty = T.launch_thread("threadIdx.y", W)
        cb_s = T.alloc_buffer((CB_SHARED,), dtype, scope="shared.dyn")
        red = T.alloc_buffer((RED,), "float32", scope="shared.dyn")
        acc = T.alloc_buffer((NACC,), "float32", scope="local")
        fa = T.alloc_buffer((MB * 8,), dtype, scope="local")
        fb = T.alloc_buffer((NI * NTN * 4,), dtype, scope="local")
        xa = T.alloc_buffer((U * MB * 2 * CW,), dtype, scope="local")
        cl = T.alloc_buffer((U * NI * CW,), CD, scope="local")
        rl = T.alloc_buffer((U * NI * CW,), RCD, scope="local")
        wv = T.alloc_buffer((1,), dtype, scope="local")
        tot = T.alloc_buffer((1,), "float32", scope="local")
        tid = ty * 32 + tx
        g = tx // 4
        q = tx % 4
        rg = ty // P
        sp = ty % P
        if SMEM_CB:
            fill_book_direct(cb_s, 0, centroids, G * K, K, NT, tid, v, v <= 8)
            if HAS_RES:
                fill_book_direct(cb_s, CB_MAIN, res_centroids, G * KR, KR, NT, tid, v, False)
            T.tvm_storage_sync("shared")
        i0 = (bx * RW + rg) * NI  # first vector row of this warp
        for a in T.unroll(NACC):
            acc[a] = T.float32(0)
        # outlier columns: B[k][n] = outlier_centroids[outlier_codes[r // VO, k], r % VO], r = i*v + n
        if HAS_OUT:
            for ost in range(-(-NOCH // P)):
                st = ost * P + sp
                if st < NOCH:
                    for mb in T.unroll(MB):
                        for h in T.unroll(2):
                            for e in T.unroll(4):
                                k = st * 16 + q * 4 + e
                                xa[(mb * 2 + h) * 4 + e] = T.if_then_else(
                                    row(by, mb, tx, h) < NB and k < OSZ,
                                    xs[T.min(row(by, mb, tx, h), NB - 1), T.min(k, OSZ - 1)], T.Cast(dtype, 0))
                        for h in T.unroll(2):
                            for e2 in T.unroll(2):
                                fa[mb * 8 + h * 2 + e2] = xa[(mb * 2 + h) * 4 + e2]
                                fa[mb * 8 + 4 + h * 2 + e2] = xa[(mb * 2 + h) * 4 + 2 + e2]
                    for ii in T.unroll(NI):
                        for nt in T.unroll(NTN):
                            for e in T.unroll(4):
                                k = st * 16 + q * 4 + e
                                r = (i0 + ii) * v + nt * 8 + g
                                fb[(ii * NTN + nt) * 4 + e] = T.if_then_else(
                                    i0 + ii < NV and nt * 8 + g < v and r < O and k < OSZ,
                                    outlier_centroids[
                                        T.Cast("int32", outlier_codes[T.min(r, O - 1) // VO, T.min(k, OSZ - 1)]),
                                        T.min(r, O - 1) % VO],
                                    T.Cast(dtype, 0))
                            for mb in T.unroll(MB):
                                T.evaluate(T.ptx_legacy.mma(
                                    "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                    fa.data, mb * 8, fb.data, (ii * NTN + nt) * 4, acc.data, ai(mb, ii, nt),
                                    False, dtype="float32"))
        # main columns: codes region, physical column OSZ + c of xs
        # U chunks per iteration: all their loads (codes from HBM, activations from L2) are issued before the first
        # lookup, so a warp keeps U loads in flight instead of waiting on one (latency-bound otherwise)
        for it in range(-(-CPS // U)):
            for u in T.unroll(U):
                if it * U + u < CPS and sp * CPS + it * U + u < NCH:
                    for mb in T.unroll(MB):
                        for h in T.unroll(2):
                            if VEC:
                                if row(by, mb, tx, h) < NB and col0(sp, it * U + u, tx) < L:
                                    xa[vr(((u * MB + mb) * 2 + h) * CW, CW)] = xs[
                                        row(by, mb, tx, h), vr(OSZ + col0(sp, it * U + u, tx), CW)]
                                else:
                                    for e in T.unroll(CW):
                                        xa[((u * MB + mb) * 2 + h) * CW + e] = T.Cast(dtype, 0)
                            else:
                                for e in T.unroll(CW):
                                    xa[((u * MB + mb) * 2 + h) * CW + e] = T.if_then_else(
                                        row(by, mb, tx, h) < NB and col0(sp, it * U + u, tx) + e < L,
                                        xs[T.min(row(by, mb, tx, h), NB - 1),
                                           OSZ + T.min(col0(sp, it * U + u, tx) + e, L - 1)],
                                        T.Cast(dtype, 0))
                    for ii in T.unroll(NI):
                        if VEC:
                            if i0 + ii < NV and col0(sp, it * U + u, tx) < L:
                                cl[vr((u * NI + ii) * CW, CW)] = codes[i0 + ii, vr(col0(sp, it * U + u, tx), CW)]
                                if HAS_RES:
                                    rl[vr((u * NI + ii) * CW, CW)] = res_codes[i0 + ii, vr(col0(sp, it * U + u, tx), CW)]  # noqa: E501
                        else:
                            for e in T.unroll(CW):
                                if i0 + ii < NV and col0(sp, it * U + u, tx) + e < L:
                                    cl[(u * NI + ii) * CW + e] = codes[i0 + ii, col0(sp, it * U + u, tx) + e]
                                    if HAS_RES:
                                        rl[(u * NI + ii) * CW + e] = res_codes[i0 + ii, col0(sp, it * U + u, tx) + e]
            for u in T.unroll(U):
                if it * U + u < CPS and sp * CPS + it * U + u < NCH:
                    for d in T.unroll(DS):
                        for mb in T.unroll(MB):
                            for h in T.unroll(2):
                                for e2 in T.unroll(2):
                                    fa[mb * 8 + h * 2 + e2] = xa[((u * MB + mb) * 2 + h) * CW + d * 4 + e2]
                                    fa[mb * 8 + 4 + h * 2 + e2] = xa[((u * MB + mb) * 2 + h) * CW + d * 4 + 2 + e2]
                        for ii in T.unroll(NI):
                            for nt in T.unroll(NTN):
                                for e in T.unroll(4):
                                    col = col0(sp, it * U + u, tx) + d * 4 + e
                                    n = nt * 8 + g
                                    code = T.min(T.Cast("int32", cl[(u * NI + ii) * CW + d * 4 + e]), K - 1)
                                    grp = T.min(col, L - 1) // S
                                    ok = i0 + ii < NV and n < v and col < L
                                    if SMEM_CB:
                                        wv[0] = cb_s[(grp * K + code) * v + T.min(n, v - 1)]
                                    else:
                                        wv[0] = centroids[grp, code, T.min(n, v - 1)]
                                    if HAS_RES:
                                        rcode = T.min(T.Cast("int32", rl[(u * NI + ii) * CW + d * 4 + e]), KR - 1)
                                        if SMEM_CB:
                                            wv[0] = wv[0] + cb_s[CB_MAIN + (grp * KR + rcode) * v + T.min(n, v - 1)]
                                        else:
                                            wv[0] = wv[0] + res_centroids[grp, rcode, T.min(n, v - 1)]
                                    fb[(ii * NTN + nt) * 4 + e] = T.if_then_else(ok, wv[0], T.Cast(dtype, 0))
                                for mb in T.unroll(MB):
                                    T.evaluate(T.ptx_legacy.mma(
                                        "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                        fa.data, mb * 8, fb.data, (ii * NTN + nt) * 4, acc.data, ai(mb, ii, nt),
                                        False, dtype="float32"))
        # splits 1..P-1 park their accumulators in shared memory; split 0 adds them and stores
        if P > 1:
            if SMEM_CB:  # TVM places `red` over the codebook (merged shared.dyn): every lookup must be done first.
                # Written out (TVM's ThreadSync would add it, but cannot under a host-side condition, see
                # cuda_dequant_gemm.py, where this kernel is one branch of a PrimFunc)
                T.tvm_storage_sync("shared")
            if sp > 0:
                for a in T.unroll(NACC):
                    red[((rg * (P - 1) + sp - 1) * NACC + a) * 32 + tx] = acc[a]
            T.tvm_storage_sync("shared")
        if sp == 0:
            for mb in T.unroll(MB):
                for ii in T.unroll(NI):
                    for nt in T.unroll(NTN):
                        for c in T.unroll(4):
                            tot[0] = acc[ai(mb, ii, nt) + c]
                            if P > 1:
                                for s in T.unroll(P - 1):
                                    tot[0] = tot[0] + red[((rg * (P - 1) + s) * NACC + ai(mb, ii, nt) + c) * 32 + tx]
                            n = nt * 8 + q * 2 + c % 2
                            r = (i0 + ii) * v + n
                            if row(by, mb, tx, c // 2) < NB and n < v and i0 + ii < NV and r < O:
                                if add_dot or add_bias or add_residual:
                                    y[row(by, mb, tx, c // 2), out_col(r)] = epilogue(
                                        T.Cast(dtype, tot[0]), dot, bias, res, row(by, mb, tx, c // 2), r)
                                else:
                                    y[row(by, mb, tx, c // 2), out_col(r)] = T.Cast(dtype, tot[0])

    return mma
