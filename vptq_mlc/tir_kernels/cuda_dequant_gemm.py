"""CUDA prefill of a VQ layer (fp16, symbolic row count): the VQ tensor-core kernel for short prompts, "dequantize
the layer into a scratch buffer, then a dense tensor-core GEMM" for long ones, chosen at run time by the row count
inside one PrimFunc (the host code TVM generates tests the row count and launches one path's kernels).

Why: the VQ MMA kernel (`cuda_mma.py`) builds every B fragment from 2-byte codebook lookups, so its prefill is
instruction-bound (0.12-0.19x torch fp16 on the H100 at Llama-2-7B shapes); the dense fp16 GEMM of
`cuda_dense_mma.py` runs 0.37-0.46x cuBLAS from 128 rows. Writing the dense weight costs one pass over it
(written once, read back by the GEMM) per call, independent of the row count, so above a few dozen rows it pays.

Dequantize kernel: a thread owns one vector row i (the `v` output rows i*v .. i*v+v-1) and 8 consecutive input
columns; it reads the 8 codes, looks each entry up (one `v`-wide load per entry, through L1/L2; the residual
entry is added in fp16, as the reference `dequantize` rounds it), transposes in registers and writes `v` 16-byte
stores; the 32 lanes of a warp write 512 contiguous bytes of each output row. Outlier columns (their own
codebook, vector length along the output) take scalar lookups. The weight is in the kernel's column order (the
order of `xs`, after the activation prologue's perm / norm scale), without the norm: W[r, k] exactly as
`cuda_prefill.dequant_matmul_compute` defines it, so `y = xs @ W^T` is what every VQ kernel computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.vq_layout import code_dtype, vq_operand_shapes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, keep_params, load_book_entry, vr
from vptq_mlc.tir_kernels.cuda_dense_mma import gemm_ladder, gemm_macros, plan_dense, symbolic_plans
from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM, MMA_ROWS, mma_macro, plan_mma
from vptq_mlc.tir_kernels.generic import kernel_dims

# Row count from which a symbolic-row prefill dequantizes the layer and runs the dense GEMM. Cost model (H100,
# Llama-2-7B shape, one prefill call): the VQ MMA kernel costs ~0.2 ms per row for the whole model (4970 tok/s at
# 512 rows); dequantizing all weights writes and reads back ~13.5 GB (~9 ms per call at ~1.5 TB/s each way), and
# the dense GEMM at ~0.42x cuBLAS (21458 tok/s) costs ~0.11 ms per row, so the two meet at 9 / (0.2 - 0.11) ~ 100
# rows; rounded up to the dense GEMM's 128-row tile. To be confirmed by `bench kernels --prefill` on the H100.
DEQUANT_GEMM_FROM_ROWS = 128
COLS_PER_THREAD = 8  # one 16-byte fp16 store per output row
DEQUANT_THREADS = 256


def entry_width(v: int) -> int:
    """Elements per codebook-entry load: 16 bytes where the entry's alignment allows, else 8, 4 or 2."""
    for w in (8, 4, 2):
        if v % w == 0:
            return w
    return 1


def dequant_gemm_supported(cfg: VPTQLayerConfig, dtype: str) -> bool:
    """The dense GEMM takes the layer's input size (a multiple of its K step) and the stores stay 16-byte aligned."""
    return (dtype == "float16" and cfg.in_features % COLS_PER_THREAD == 0
            and plan_dense(None, cfg.in_features) is not None)


def dequant_macro(cfg: VPTQLayerConfig, dtype: str, cuda: bool = True):
    """The dequantize launch as a macro over (centroids, codes, res_centroids, res_codes, outlier_centroids,
    outlier_codes, w[O, I]). `cuda=False` runs the same body in serial loops over the block and thread indices
    (a CPU build of the identical per-thread code, for tests without a GPU)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    if I != OSZ + L or I % COLS_PER_THREAD:
        raise ValueError(f"dequantize kernel needs in_features = outliers + groups * group_size, a multiple of "
                         f"{COLS_PER_THREAD}; got {I} ({OSZ} + {L})")
    CD, RCD = code_dtype(K), code_dtype(KR1)
    C8 = COLS_PER_THREAD
    NCHUNK = I // C8
    TH = DEQUANT_THREADS
    GX = -(-NCHUNK // TH)
    EV = entry_width(v)
    VEC_CODES = not HAS_OUT and L % C8 == 0  # a thread's 8 codes in one load (8 or 16 bytes, aligned)

    def chunk(bx, tx):  # a thread's 16-byte column chunk; inline, so the codegen sees the stores' alignment
        return bx * TH + tx

    @T.macro
    def main_column(bx, tx, e, centroids, res_centroids, ent, rent, wl, cl, rl):
        """Column e of the chunk from the main (and residual) codebook: v outputs from one entry."""
        load_book_entry(ent, centroids, T.max(chunk(bx, tx) * C8 + e - OSZ, 0) // S, T.Cast("int32", cl[e]), v, EV)
        if HAS_RES:
            load_book_entry(rent, res_centroids, T.max(chunk(bx, tx) * C8 + e - OSZ, 0) // S,
                            T.Cast("int32", rl[e]), v, EV)
            for j in T.unroll(v):
                wl[j * C8 + e] = ent[j] + rent[j]
        else:
            for j in T.unroll(v):
                wl[j * C8 + e] = ent[j]

    @T.macro
    def body(bx, by, tx, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w):
        ent = T.alloc_buffer((v,), dtype, scope="local")
        rent = T.alloc_buffer((v,), dtype, scope="local")
        wl = T.alloc_buffer((v * C8,), dtype, scope="local")
        cl = T.alloc_buffer((C8,), CD, scope="local")
        rl = T.alloc_buffer((C8,), RCD, scope="local")
        if chunk(bx, tx) < NCHUNK:
            if VEC_CODES:
                cl[vr(0, C8)] = codes[by, vr(chunk(bx, tx) * C8, C8)]
                if HAS_RES:
                    rl[vr(0, C8)] = res_codes[by, vr(chunk(bx, tx) * C8, C8)]
            else:
                for e in T.unroll(C8):
                    cl[e] = codes[by, T.max(chunk(bx, tx) * C8 + e - OSZ, 0)]
                    if HAS_RES:
                        rl[e] = res_codes[by, T.max(chunk(bx, tx) * C8 + e - OSZ, 0)]
            for e in T.unroll(C8):
                if HAS_OUT:
                    if chunk(bx, tx) * C8 + e < OSZ:
                        for j in T.unroll(v):
                            wl[j * C8 + e] = outlier_centroids[
                                T.Cast("int32", outlier_codes[T.min(by * v + j, O - 1) // VO,
                                                              T.min(chunk(bx, tx) * C8 + e, OSZ - 1)]),
                                T.min(by * v + j, O - 1) % VO]
                    else:
                        main_column(bx, tx, e, centroids, res_centroids, ent, rent, wl, cl, rl)
                else:
                    main_column(bx, tx, e, centroids, res_centroids, ent, rent, wl, cl, rl)
            for j in T.unroll(v):
                if by * v + j < O:
                    w[by * v + j, vr(chunk(bx, tx) * C8, C8)] = wl[vr(j * C8, C8)]

    @T.macro
    def launch(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w):
        # `with`: the launch scope ends here, so a kernel launched after this one is not nested in it
        with T.launch_thread("blockIdx.x", GX) as bx:
            with T.launch_thread("blockIdx.y", NV) as by:
                with T.launch_thread("threadIdx.x", TH) as tx:
                    body(bx, by, tx, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes,
                         w)

    @T.macro
    def serial(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w):
        for by in range(NV):
            for bx in range(GX):
                for tx in range(TH):
                    body(bx, by, tx, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes,
                         w)

    return launch if cuda else serial


@dataclass(frozen=True)
class DequantPlan:
    """Launch shape of the dequantize kernel. `smem_book`: the codebooks are copied into shared memory once per
    CTA and every CTA walks `rows_per_cta` vector rows (whole rows, `threads` 16-byte column chunks at a time),
    so entry lookups are shared-memory loads instead of scattered L1/L2 loads; else one CTA per (vector row,
    `threads` chunks) with lookups through L1/L2 (books too large for shared memory, outlier columns)."""

    threads: int = DEQUANT_THREADS
    rows_per_cta: int = 1
    smem_book: bool = False


L1_BOOK_PLAN = DequantPlan()
SMEM_BOOK_PLAN = DequantPlan(threads=256, rows_per_cta=4, smem_book=True)
SMEM_BOOK_MAX_BYTES = 96 * 1024  # under the 99 KB of dynamic shared memory sm_86 / sm_89 give a block


def smem_book_bytes(cfg: VPTQLayerConfig, dtype_bytes: int = 2) -> int | None:
    """Shared memory the codebooks (main + residual, every group) take, or None when the layer cannot keep them
    there (outlier columns, entries not a whole number of 16-byte chunks in total, or too large)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    elems = G * K * v + (G * KR1 * v if HAS_RES else 0)
    if HAS_OUT or (G * K * v) % COLS_PER_THREAD or (G * KR1 * v) % COLS_PER_THREAD:
        return None
    nbytes = elems * dtype_bytes
    return nbytes if nbytes <= SMEM_BOOK_MAX_BYTES else None


def dequant_smem_macro(cfg: VPTQLayerConfig, dtype: str, plan: DequantPlan, cuda: bool = True):
    """The dequantize launch with the codebooks in shared memory (`plan.smem_book`; `smem_book_bytes` must not
    be None), as a macro over the same operands as `dequant_macro`. Per thread the same work as there (8 codes,
    one entry per code, a register transpose, `v` 16-byte stores), the entries from shared memory."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    if smem_book_bytes(cfg) is None or I % COLS_PER_THREAD:
        raise ValueError(f"the codebooks of a {O}x{I} layer (K={K}, v={v}, groups {G}, outliers {OSZ}) do not fit "
                         f"the shared-memory dequantize kernel")
    CD, RCD = code_dtype(K), code_dtype(KR1)
    C8 = COLS_PER_THREAD
    NCHUNK = I // C8
    TH, RB = plan.threads, plan.rows_per_cta
    NCTA = -(-NV // RB)
    CIT = -(-NCHUNK // TH)  # column-chunk iterations per vector row
    EV = entry_width(v)
    BOOK, RBOOK = G * K * v, G * KR1 * v
    BOOK_IT, RBOOK_IT = -(-(BOOK // C8) // TH), -(-(RBOOK // C8) // TH)
    VEC_CODES = L % C8 == 0

    @T.macro
    def fill(tx, centroids, res_centroids, book, rbook):
        """Thread tx's share of the codebook copy into shared memory."""
        cf = T.decl_buffer((BOOK,), dtype, data=centroids.data)
        for it in T.unroll(BOOK_IT):
            if (it * TH + tx) * C8 < BOOK:
                book[vr((it * TH + tx) * C8, C8)] = cf[vr((it * TH + tx) * C8, C8)]
        if HAS_RES:
            rcf = T.decl_buffer((RBOOK,), dtype, data=res_centroids.data)
            for it in T.unroll(RBOOK_IT):
                if (it * TH + tx) * C8 < RBOOK:
                    rbook[vr((it * TH + tx) * C8, C8)] = rcf[vr((it * TH + tx) * C8, C8)]

    @T.macro
    def work(bx, tx, codes, res_codes, w, book, rbook):
        ent = T.alloc_buffer((v,), dtype, scope="local")
        rent = T.alloc_buffer((v,), dtype, scope="local")
        wl = T.alloc_buffer((v * C8,), dtype, scope="local")
        cl = T.alloc_buffer((C8,), CD, scope="local")
        rl = T.alloc_buffer((C8,), RCD, scope="local")
        for r in range(RB):
            for ci in range(CIT):
                if bx * RB + r < NV and ci * TH + tx < NCHUNK:
                    if VEC_CODES:
                        cl[vr(0, C8)] = codes[bx * RB + r, vr((ci * TH + tx) * C8, C8)]
                        if HAS_RES:
                            rl[vr(0, C8)] = res_codes[bx * RB + r, vr((ci * TH + tx) * C8, C8)]
                    else:
                        for e in T.unroll(C8):
                            cl[e] = codes[bx * RB + r, (ci * TH + tx) * C8 + e]
                            if HAS_RES:
                                rl[e] = res_codes[bx * RB + r, (ci * TH + tx) * C8 + e]
                    for e in T.unroll(C8):
                        for j0 in T.unroll(v // EV):
                            ent[vr(j0 * EV, EV)] = book[vr((((ci * TH + tx) * C8 + e) // S * K
                                                            + T.Cast("int32", cl[e])) * v + j0 * EV, EV)]
                        if HAS_RES:
                            for j0 in T.unroll(v // EV):
                                rent[vr(j0 * EV, EV)] = rbook[vr((((ci * TH + tx) * C8 + e) // S * KR1
                                                                  + T.Cast("int32", rl[e])) * v + j0 * EV, EV)]
                            for j in T.unroll(v):
                                wl[j * C8 + e] = ent[j] + rent[j]
                        else:
                            for j in T.unroll(v):
                                wl[j * C8 + e] = ent[j]
                    for j in T.unroll(v):
                        if (bx * RB + r) * v + j < O:
                            w[(bx * RB + r) * v + j, vr((ci * TH + tx) * C8, C8)] = wl[vr(j * C8, C8)]

    @T.macro
    def launch(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w):
        with T.launch_thread("blockIdx.x", NCTA) as bx:
            with T.launch_thread("threadIdx.x", TH) as tx:
                book = T.alloc_buffer((BOOK,), dtype, scope="shared.dyn")
                rbook = T.alloc_buffer((RBOOK if HAS_RES else C8,), dtype, scope="shared.dyn")
                fill(tx, centroids, res_centroids, book, rbook)
                T.tvm_storage_sync("shared")
                work(bx, tx, codes, res_codes, w, book, rbook)

    @T.macro
    def serial(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w):
        book = T.alloc_buffer((BOOK,), dtype)
        rbook = T.alloc_buffer((RBOOK if HAS_RES else C8,), dtype)
        for tx in range(TH):
            fill(tx, centroids, res_centroids, book, rbook)
        for bx in range(NCTA):
            for tx in range(TH):
                work(bx, tx, codes, res_codes, w, book, rbook)

    return launch if cuda else serial


def plan_dequant(cfg: VPTQLayerConfig) -> DequantPlan:
    """Shared-memory codebooks where they fit, else lookups through L1/L2."""
    return L1_BOOK_PLAN


def dequant_launch(cfg: VPTQLayerConfig, dtype: str, plan: DequantPlan | None = None, cuda: bool = True):
    plan = plan or plan_dequant(cfg)
    return dequant_smem_macro(cfg, dtype, plan, cuda) if plan.smem_book else dequant_macro(cfg, dtype, cuda)


@dataclass(frozen=True)
class FoldPlan:
    """Launch shape of the folding dequantize kernel: `threads` per CTA, `rows_per_cta` vector rows per CTA (the
    CTA's inverse permutation and final-order scale in shared memory serve all of them)."""

    threads: int = DEQUANT_THREADS
    rows_per_cta: int = 1


FOLD_PLAN = FoldPlan()
# Layers whose CTA needs more than 48 KB of shared memory (the 11008-wide down projection with a permutation: 66 KB,
# 3 CTAs and so 768 of 2048 threads per SM at 256 threads) run 384 threads per CTA. H100 sweep, 4096x11008
# (`bench/prefill_gemm.py run ART --kinds fold`, bench/RESULTS.md "Session 13"): v8-k4096-0 72.4 -> 42.0 us,
# v8-k256-256 54.6 -> 43.5, v8-k65536-256 75.8 -> 74.3; on the 4096-wide layers 256 threads were within 3% of
# every other shape.
WIDE_FOLD_PLAN = FoldPlan(threads=384, rows_per_cta=1)
WIDE_FOLD_SMEM = 48 * 1024


def plan_fold(cfg: VPTQLayerConfig, has_perm: bool) -> FoldPlan:
    """The folding dequantize's launch shape for a layer: the one place the pipeline, the shared-memory check and
    the launch sweep (`bench/prefill_gemm.py --only fold`) take it from: WIDE_FOLD_PLAN where FOLD_PLAN's CTA needs
    more than WIDE_FOLD_SMEM of shared memory, else FOLD_PLAN."""
    if fold_smem_bytes(cfg, has_perm, FOLD_PLAN) > WIDE_FOLD_SMEM:
        return WIDE_FOLD_PLAN
    return FOLD_PLAN


def fold_smem_bytes(cfg: VPTQLayerConfig, has_perm: bool, plan: FoldPlan | None = None) -> int:
    """Shared memory of the folding dequantize kernel: inverse permutation (2 bytes a column) and final-order
    scale (2 bytes) with a permutation, plus `rows_per_cta` rows of codes (and residual codes)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    plan = plan or plan_fold(cfg, has_perm)
    code_bytes = 1 if code_dtype(K) == "uint8" else 2
    res_bytes = (1 if code_dtype(KR1) == "uint8" else 2) if HAS_RES else 0
    return (4 * I if has_perm else 0) + plan.rows_per_cta * L * (code_bytes + res_bytes)


def dequant_fold_macro(cfg: VPTQLayerConfig, dtype: str, has_perm: bool, plan: FoldPlan | None = None,
                       cuda: bool = True):
    """The dequantize launch that folds the layer's activation-side prologue into the weight, as a macro over
    (centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, perm, col_scale, weight_bias,
    w[O, I]): `w[o, perm[k]] = (W[o, k] * col_scale[k]) + weight_bias[perm[k]]`, each op rounded to `dtype`, i.e.
    exactly the final-order dense weight of `checkpoint.dequantize` (VPTQ's own norm: multiply, then add), so
    `y = x @ w^T` is the whole VQ linear but its bias on the unpermuted activation, with no prologue and no
    norm-bias dot: `sum_j x[j] * (W'[o, j] + wb[j]) = sum_j x[j] * W'[o, j] + x . wb`.

    Column order and coalescing: writing `w[o, perm[k]]` from the code order would scatter 2-byte stores over the
    row (a 16-byte chunk of 8 codes lands in 8 different 32-byte sectors: ~16x the L2 store transactions of the
    plain kernel's 16-byte stores). So a thread owns 8 consecutive *final* columns c (one 16-byte store per output
    row, a warp 512 contiguous bytes, as in `dequant_macro`) and gathers on the read side through the inverse
    permutation k = inv[c]: each CTA first builds inv (from `perm`, a scatter into shared memory) and the scale in
    final order, and copies its vector rows' codes into shared memory with 16-byte loads, so the per-column code
    and scale gathers are shared-memory loads (a gather from global memory is L1-sector bound); the codebook
    entries are read through L1/L2 as in `dequant_macro`. Per CTA that is 4 * I bytes of perm / scale read from
    L2 next to v * I * 2 bytes written (8 * 2 bytes at v = 8): ~25% more L2 reads than the plain kernel, not HBM.
    `plan`: another launch shape than `plan_fold`'s. `cuda=False`: the same per-thread code in serial loops (CPU
    tests)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    if I != OSZ + L or I % COLS_PER_THREAD:
        raise ValueError(f"dequantize kernel needs in_features = outliers + groups * group_size, a multiple of "
                         f"{COLS_PER_THREAD}; got {I} ({OSZ} + {L})")
    CD, RCD = code_dtype(K), code_dtype(KR1)
    IDT = "uint16" if I <= 65536 else "int32"
    C8 = COLS_PER_THREAD
    NCHUNK = I // C8
    plan = plan or plan_fold(cfg, has_perm)
    TH, RB = plan.threads, plan.rows_per_cta
    NCTA = -(-NV // RB)
    CIT = -(-NCHUNK // TH)  # column-chunk iterations per vector row
    PIT4 = -(-(I // 4) // TH)  # 4-column perm / scale loads per thread (I % 8 == 0)
    VEC_CODES = L % C8 == 0
    CODE_IT = -(-(L // C8) // TH) if VEC_CODES else -(-L // TH)
    EV = entry_width(v)
    HAS_PERM = has_perm
    INV_N = I if HAS_PERM else 1

    def col(kl, c0, e):  # pre-perm column of final column c0 + e
        return T.Cast("int32", kl[e]) if HAS_PERM else c0 + e

    def rounded(val, scale, wb):  # (val * scale) + wb, each op rounded to dtype (nvcc may not contract them)
        return T.Cast(dtype, T.Cast("float32", T.Cast(dtype, T.Cast("float32", val) * T.Cast("float32", scale)))
                      + T.Cast("float32", wb))

    @T.macro
    def main_column(r, k, e, centroids, res_centroids, ent, rent, wl, cd_s, rc_s):
        """Column e of the chunk (pre-perm column k >= OSZ) from the main (and residual) codebook."""
        load_book_entry(ent, centroids, T.max(k - OSZ, 0) // S, T.Cast("int32", cd_s[r * L + T.max(k - OSZ, 0)]),
                        v, EV)
        if HAS_RES:
            load_book_entry(rent, res_centroids, T.max(k - OSZ, 0) // S,
                            T.Cast("int32", rc_s[r * L + T.max(k - OSZ, 0)]), v, EV)
            for j in T.unroll(v):
                wl[j * C8 + e] = ent[j] + rent[j]
        else:
            for j in T.unroll(v):
                wl[j * C8 + e] = ent[j]

    @T.macro
    def stage(bx, tx, codes, res_codes, perm, col_scale, cd_s, rc_s, inv_s, sc_s):
        """inv[perm[k]] = k and the scale in final order (with a permutation), and the CTA's rows of codes. The
        permutation and scale are read 4 columns per load and every load of the thread is issued before its first
        scatter store: a loop of load-then-store waits one L2 round trip per iteration, and the CTA's work waits
        for the whole scatter."""
        if HAS_PERM:
            pl = T.alloc_buffer((PIT4 * 4,), "int32", scope="local")
            sl = T.alloc_buffer((PIT4 * 4,), dtype, scope="local")
            for it in T.unroll(PIT4):
                if (it * TH + tx) * 4 < I:
                    pl[vr(it * 4, 4)] = perm[vr((it * TH + tx) * 4, 4)]
                    sl[vr(it * 4, 4)] = col_scale[vr((it * TH + tx) * 4, 4)]
            for it in T.unroll(PIT4):
                if (it * TH + tx) * 4 < I:
                    for e in T.unroll(4):
                        inv_s[pl[it * 4 + e]] = T.Cast(IDT, (it * TH + tx) * 4 + e)
                        sc_s[pl[it * 4 + e]] = sl[it * 4 + e]
        for r in range(RB):
            if bx * RB + r < NV:
                for it in range(CODE_IT):
                    if VEC_CODES:
                        if (it * TH + tx) * C8 < L:
                            cd_s[vr(r * L + (it * TH + tx) * C8, C8)] = codes[bx * RB + r, vr((it * TH + tx) * C8, C8)]
                            if HAS_RES:
                                rc_s[vr(r * L + (it * TH + tx) * C8, C8)] = res_codes[
                                    bx * RB + r, vr((it * TH + tx) * C8, C8)]
                    else:
                        if it * TH + tx < L:
                            cd_s[r * L + it * TH + tx] = codes[bx * RB + r, it * TH + tx]
                            if HAS_RES:
                                rc_s[r * L + it * TH + tx] = res_codes[bx * RB + r, it * TH + tx]

    @T.macro
    def work(bx, tx, centroids, res_centroids, outlier_centroids, outlier_codes, col_scale, weight_bias, w,
             cd_s, rc_s, inv_s, sc_s):
        ent = T.alloc_buffer((v,), dtype, scope="local")
        rent = T.alloc_buffer((v,), dtype, scope="local")
        wl = T.alloc_buffer((v * C8,), dtype, scope="local")
        scl = T.alloc_buffer((C8,), dtype, scope="local")
        wbl = T.alloc_buffer((C8,), dtype, scope="local")
        kl = T.alloc_buffer((C8,), IDT, scope="local")
        for r in range(RB):
            for ci in range(CIT):
                if bx * RB + r < NV and ci * TH + tx < NCHUNK:
                    if HAS_PERM:
                        scl[vr(0, C8)] = sc_s[vr((ci * TH + tx) * C8, C8)]
                        kl[vr(0, C8)] = inv_s[vr((ci * TH + tx) * C8, C8)]
                    else:
                        scl[vr(0, C8)] = col_scale[vr((ci * TH + tx) * C8, C8)]
                    wbl[vr(0, C8)] = weight_bias[vr((ci * TH + tx) * C8, C8)]
                    for e in T.unroll(C8):
                        if HAS_OUT:
                            if col(kl, (ci * TH + tx) * C8, e) < OSZ:
                                for j in T.unroll(v):
                                    wl[j * C8 + e] = outlier_centroids[
                                        T.Cast("int32", outlier_codes[
                                            T.min((bx * RB + r) * v + j, O - 1) // VO,
                                            T.min(col(kl, (ci * TH + tx) * C8, e), OSZ - 1)]),
                                        T.min((bx * RB + r) * v + j, O - 1) % VO]
                            else:
                                main_column(r, col(kl, (ci * TH + tx) * C8, e), e, centroids, res_centroids, ent,
                                            rent, wl, cd_s, rc_s)
                        else:
                            main_column(r, col(kl, (ci * TH + tx) * C8, e), e, centroids, res_centroids, ent, rent,
                                        wl, cd_s, rc_s)
                    for j in T.unroll(v):
                        for e in T.unroll(C8):
                            wl[j * C8 + e] = rounded(wl[j * C8 + e], scl[e], wbl[e])
                    for j in T.unroll(v):
                        if (bx * RB + r) * v + j < O:
                            w[(bx * RB + r) * v + j, vr((ci * TH + tx) * C8, C8)] = wl[vr(j * C8, C8)]

    @T.macro
    def launch(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, perm, col_scale,
               weight_bias, w):
        with T.launch_thread("blockIdx.x", NCTA) as bx:
            with T.launch_thread("threadIdx.x", TH) as tx:
                inv_s = T.alloc_buffer((INV_N,), IDT, scope="shared.dyn")
                sc_s = T.alloc_buffer((INV_N,), dtype, scope="shared.dyn")
                cd_s = T.alloc_buffer((RB * L,), CD, scope="shared.dyn")
                rc_s = T.alloc_buffer((RB * L if HAS_RES else C8,), RCD, scope="shared.dyn")
                stage(bx, tx, codes, res_codes, perm, col_scale, cd_s, rc_s, inv_s, sc_s)
                T.tvm_storage_sync("shared")
                work(bx, tx, centroids, res_centroids, outlier_centroids, outlier_codes, col_scale, weight_bias, w,
                     cd_s, rc_s, inv_s, sc_s)

    @T.macro
    def serial(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, perm, col_scale,
               weight_bias, w):
        inv_s = T.alloc_buffer((INV_N,), IDT)
        sc_s = T.alloc_buffer((INV_N,), dtype)
        cd_s = T.alloc_buffer((RB * L,), CD)
        rc_s = T.alloc_buffer((RB * L if HAS_RES else C8,), RCD)
        for bx in range(NCTA):
            for tx in range(TH):
                stage(bx, tx, codes, res_codes, perm, col_scale, cd_s, rc_s, inv_s, sc_s)
            for tx in range(TH):
                work(bx, tx, centroids, res_centroids, outlier_centroids, outlier_codes, col_scale, weight_bias, w,
                     cd_s, rc_s, inv_s, sc_s)

    return launch if cuda else serial


def _operands(cfg: VPTQLayerConfig, *extra: str) -> set[str]:
    return {"xs", "y", *vq_operand_shapes(cfg), *extra}


def vq_dequantize_func(cfg: VPTQLayerConfig, dtype: str, cuda: bool = True,
                       plan: DequantPlan | None = None) -> tirx.PrimFunc:
    """PrimFunc(*operands, w[O, I]): the dequantize step alone (`cuda=False`: serial loops, for a CPU build;
    `plan`: another launch shape than `plan_dequant`'s, for comparisons)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    dq = dequant_launch(cfg, dtype, plan, cuda)

    @T.prim_func(private=True)
    def kernel(
        centroids: T.Buffer((G, K, v), dtype),
        codes: T.Buffer((NV, L), CD),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        res_codes: T.Buffer((NV, L), RCD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        w: T.Buffer((O, I), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        dq(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w)

    return keep_params(kernel, _operands(cfg, "w"))


def vq_prefill_cuda(cfg: VPTQLayerConfig, dtype: str, from_rows: int = DEQUANT_GEMM_FROM_ROWS,
                    dequant_plan: DequantPlan | None = None, gemms: Callable | None = None,
                    wgmma: bool = False,
                    ) -> tuple[tirx.PrimFunc, tuple[tuple[tuple[int, ...], str], ...]]:
    """(PrimFunc(xs[n, I], *operands, w[O, I], y[n, O]), its scratch outputs) for a symbolic row count n: the VQ
    MMA kernel with its decode plan for n <= 16 and its prefill plan for n < `from_rows`, else dequantize into the
    scratch `w` + the dense GEMM. `from_rows=0` forces the dequantize path for every n (bench comparisons);
    `dequant_plan` another dequantize launch than `plan_dequant`'s (check suite, comparisons). Layers the dense
    GEMM cannot take get the VQ MMA kernel alone and no scratch. `gemms(rows, O, I, dtype)`: another GPU's dense
    GEMM macros for the dequantized weight (ROCm's MFMA GEMM, with `from_rows=0`: no CUDA kernel is pasted).
    `wgmma`: the CUDA GEMM's long-prompt plan is the wgmma kernel (sm_90a builds only, cuda_dense_mma.gemm_macros)."""
    from vptq_mlc.tir_kernels.cuda_mma import vq_mma_cuda

    if not dequant_gemm_supported(cfg, dtype):
        return vq_mma_cuda(cfg, dtype, None), ()
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    NB = tirx.Var("n", "int64")
    FROM = from_rows
    mma = mma_macro(cfg, dtype, None, NB)
    # up to 16 rows (a short prompt, the new tokens after a cached prefix, a small prefill chunk): the decode plan,
    # one 16-row tile per CTA split over the input as at batch 16, instead of the prefill plan's 64-row tiles
    few = mma_macro(cfg, dtype, None, NB, plan=plan_mma(cfg))
    FEW = MMA_ROWS if FROM > MMA_ROWS else 0
    dq = dequant_launch(cfg, dtype, dequant_plan)
    # rows in int32 inside the GEMM (as in dense_mma_cuda): indices stay below 2^31 (rows * max(O, I))
    if gemms is None:
        macros = gemm_macros(symbolic_plans(O, I, above_rows=max(0, FROM - 1)), T.Cast("int32", NB), O, I, dtype,
                             None, wgmma=wgmma)
    else:
        macros = gemms(T.Cast("int32", NB), O, I, dtype)
    gemm = gemm_ladder(macros, NB)

    @T.prim_func(private=True)
    def kernel(
        xs: T.Buffer((NB, I), dtype),
        centroids: T.Buffer((G, K, v), dtype),
        codes: T.Buffer((NV, L), CD),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        res_codes: T.Buffer((NV, L), RCD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        w: T.Buffer((O, I), dtype),
        y: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        xf = T.decl_buffer((NB * I,), dtype, data=xs.data)
        yf = T.decl_buffer((NB * O,), dtype, data=y.data)
        if NB <= 0:  # nothing to do (the GEMM's row clamp needs a row)
            T.evaluate(0)
        elif FEW > 0 and NB <= FEW:
            few(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y)
        elif FROM > 0 and NB < FROM:
            mma(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y)
        else:
            dq(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, w)
            gemm(xf, w, yf)

    return keep_params(kernel, _operands(cfg, "w")), (((O, I), dtype),)


def fold_supported(cfg: VPTQLayerConfig, dtype: str) -> bool:
    """The folded prefill serves the layer: a normed layer the dense GEMM takes whose folding kernel's shared
    memory fits every default arch."""
    return (cfg.enable_norm and dequant_gemm_supported(cfg, dtype)
            and fold_smem_bytes(cfg, cfg.enable_perm) <= MAX_DYN_SMEM)


def _fold_operands(cfg: VPTQLayerConfig, has_perm: bool, has_bias: bool) -> tuple[str, ...]:
    """The layer operands a folded prefill PrimFunc reads after (x, xs, dot), in its parameter order."""
    return (*vq_operand_shapes(cfg), *(("perm",) if has_perm else ()), "col_scale", "weight_bias",
            *(("bias",) if has_bias else ()))


def vq_fold_dequantize_func(cfg: VPTQLayerConfig, dtype: str, cuda: bool = True,
                            plan: FoldPlan | None = None) -> tirx.PrimFunc:
    """PrimFunc(*operands, [perm], col_scale, weight_bias, w[O, I]): the folding dequantize step alone
    (`cuda=False`: serial loops, for a CPU build)."""
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    has_perm = cfg.enable_perm
    dq = dequant_fold_macro(cfg, dtype, has_perm, plan, cuda)

    @T.prim_func(private=True)
    def kernel(
        centroids: T.Buffer((G, K, v), dtype),
        codes: T.Buffer((NV, L), CD),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        res_codes: T.Buffer((NV, L), RCD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        perm: T.Buffer((I,), "int32"),
        col_scale: T.Buffer((I,), dtype),
        weight_bias: T.Buffer((I,), dtype),
        w: T.Buffer((O, I), dtype),
    ):
        T.func_attr({"tirx.noalias": True})
        dq(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, perm, col_scale,
           weight_bias, w)

    return keep_params(kernel, {*_fold_operands(cfg, has_perm, False), "w"})


def vq_prefill_folded_cuda(cfg: VPTQLayerConfig, dtype: str, has_bias: bool,
                           from_rows: int = DEQUANT_GEMM_FROM_ROWS, fold_plan: FoldPlan | None = None,
                           wgmma: bool = False, residual: bool = False,
                           ) -> tuple[tirx.PrimFunc, tuple[str, ...], tuple[tuple[tuple[int, ...], str], ...]]:
    """The whole VQ linear of a normed layer for a symbolic row count n, prologue folded in for long prompts:
    (PrimFunc(x[n, I], xs[n, I], dot[n, 1] fp32, *operands, [perm], col_scale, weight_bias, [bias], w[O, I],
    y[n, O]), its layer operands after (x, xs, dot), its scratch outputs). y is the linear's output with the
    norm bias and the bias included:
    - n < `from_rows`: the VQ MMA kernels of `vq_prefill_cuda` on `xs` (what the activation prologue wrote), their
      epilogue adding `dot` and the bias as `VPTQLinear.finish` does (the same bits as prologue + VQ kernel +
      finish; the prologue the model runs before this call skips rows >= from_rows, `cuda_prologue.py`);
    - n >= `from_rows`: `dequant_fold_macro` writes the final-order weight (perm, scale and norm bias folded in)
      into the scratch `w`, and the dense GEMM runs on the unpermuted `x` with the bias added to the fp32 sum in
      its epilogue: no prologue pass, no norm-bias dot, no `y + dot` pass. `from_rows=0`: this path for every n
      (check suite). The norm bias is then part of the fp16 weight (as in VPTQ's own dequantized weight) instead
      of an fp32 dot added after the GEMM.
    `wgmma`: the GEMM's long-prompt plans are the wgmma kernels (sm_90a builds only, cuda_dense_mma.gemm_macros).
    `residual`: one more operand after the layer's, residual[n, O], added to y in the epilogues after its rounding
    (`residual + linear(x)` in one launch: the o_proj / down_proj of a pre-norm block)."""
    if not fold_supported(cfg, dtype):
        raise ValueError(f"the folded prefill does not serve a {cfg.out_features}x{cfg.in_features} "
                         f"{dtype} layer (norm {cfg.enable_norm})")
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    has_perm = cfg.enable_perm
    NB = tirx.Var("n", "int64")
    FROM = from_rows
    BIAS, RES = has_bias, residual
    mma = mma_macro(cfg, dtype, None, NB, add_dot=True, add_bias=BIAS, add_residual=RES)
    few = mma_macro(cfg, dtype, None, NB, plan=plan_mma(cfg), add_dot=True, add_bias=BIAS, add_residual=RES)
    FEW = MMA_ROWS if FROM > MMA_ROWS else 0
    dq = dequant_fold_macro(cfg, dtype, has_perm, fold_plan)
    macros = gemm_macros(symbolic_plans(O, I, above_rows=max(0, FROM - 1)), T.Cast("int32", NB), O, I, dtype,
                         None, wgmma=wgmma, add_bias=BIAS, add_residual=RES)
    gemm = gemm_ladder(macros, NB)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((NB, I), dtype),
        xs: T.Buffer((NB, I), dtype),
        dot: T.Buffer((NB, 1), "float32"),
        centroids: T.Buffer((G, K, v), dtype),
        codes: T.Buffer((NV, L), CD),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        res_codes: T.Buffer((NV, L), RCD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        perm: T.Buffer((I,), "int32"),
        col_scale: T.Buffer((I,), dtype),
        weight_bias: T.Buffer((I,), dtype),
        bias: T.Buffer((O,), dtype),
        residual: T.Buffer((NB, O), dtype),
        w: T.Buffer((O, I), dtype),
        y: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        xf = T.decl_buffer((NB * I,), dtype, data=x.data)
        yf = T.decl_buffer((NB * O,), dtype, data=y.data)
        if NB <= 0:  # nothing to do (the GEMM's row clamp needs a row)
            T.evaluate(0)
        elif FEW > 0 and NB <= FEW:
            if RES:  # (the residual buffer exists only with `residual`)
                few(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot, bias,
                    residual)
            else:
                few(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot, bias)
        elif FROM > 0 and NB < FROM:
            if RES:
                mma(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot, bias,
                    residual)
            else:
                mma(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot, bias)
        else:
            dq(centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, perm, col_scale,
               weight_bias, w)
            if RES:
                rf = T.decl_buffer((NB * O,), dtype, data=residual.data)
                gemm(xf, w, yf, bias, rf)
            else:
                gemm(xf, w, yf, bias)

    operands = _fold_operands(cfg, has_perm, has_bias) + (("residual",) if residual else ())
    return keep_params(kernel, {"x", "xs", "dot", *operands, "w", "y"}), operands, (((O, I), dtype),)


MAX_GROUP_LAYERS = 3  # layers one folded group launch serves (q/k/v; gate/up)


def vq_prefill_folded_group_cuda(cfg: VPTQLayerConfig, dtype: str, perms: tuple[bool, ...],
                                 from_rows: int = DEQUANT_GEMM_FROM_ROWS, fold_plan: FoldPlan | None = None,
                                 wgmma: bool = False,
                                 ) -> tuple[tirx.PrimFunc, tuple[tuple[str, ...], ...],
                                            tuple[tuple[tuple[int, ...], str], ...]]:
    """`vq_prefill_folded_cuda` for 2..3 normed layers of one config (without bias) that read the same x (q/k/v,
    gate/up), their outputs side by side in one y[n, count * O] (layer m in columns m*O .. m*O + O - 1):
    (PrimFunc(x, then per layer m: xs_m, dot_m, its operands, [perm_m], col_scale_m, weight_bias_m; then the
    scratch w[count * O, I] and y), per layer the operand names after its (xs, dot), the scratch). `perms[m]`:
    layer m has a permutation.
    - n < `from_rows`: each layer's VQ MMA kernels of `vq_prefill_folded_cuda` (on its prologue's xs and dot),
      writing its columns of y: the same bits as the layers' own calls;
    - n >= `from_rows`: each layer's folding dequantize writes its rows of the scratch w, then ONE dense GEMM
      y = x @ w^T over all count * O outputs (the same sums as the layers' own GEMMs, one launch, no concatenation
      of their outputs afterwards)."""
    count = len(perms)
    if not 2 <= count <= MAX_GROUP_LAYERS:
        raise ValueError(f"a folded group serves 2..{MAX_GROUP_LAYERS} layers, got {count}")
    if not fold_supported(cfg, dtype) or cfg.bias:
        raise ValueError(f"the folded prefill does not serve a group of {cfg.out_features}x{cfg.in_features} "
                         f"{dtype} layers (norm {cfg.enable_norm}, bias {cfg.bias})")
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    CD, RCD = code_dtype(K), code_dtype(KR1)
    NB = tirx.Var("n", "int64")
    FROM = from_rows
    FEW = MMA_ROWS if FROM > MMA_ROWS else 0
    OT = count * O
    THIRD = count == 3
    mmas = [mma_macro(cfg, dtype, None, NB, add_dot=True, y_col0=m * O) for m in range(count)]
    fews = [mma_macro(cfg, dtype, None, NB, plan=plan_mma(cfg), add_dot=True, y_col0=m * O) for m in range(count)]
    dqs = [dequant_fold_macro(cfg, dtype, p, fold_plan) for p in perms]
    m2 = 2 if THIRD else 1  # the third layer's macros (unused with two layers: the branch is not generated)
    gemm = gemm_ladder(gemm_macros(symbolic_plans(OT, I, above_rows=max(0, FROM - 1)), T.Cast("int32", NB), OT, I,
                                   dtype, None, wgmma=wgmma), NB)

    @T.macro
    def vq_rows(m, xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, dot, y):
        """Layer m below `from_rows`: its VQ MMA kernel (decode plan up to FEW rows), into its columns of y. In a
        loop of one: the MMA macro's launch scope runs to the end of its block, so a launch after it in the same
        block would be nested in it."""
        for _ in range(1):
            if FEW > 0 and NB <= FEW:
                fews[m](xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot)
            else:
                mmas[m](xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, dot)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((NB, I), dtype),
        xs_0: T.Buffer((NB, I), dtype),
        dot_0: T.Buffer((NB, 1), "float32"),
        centroids_0: T.Buffer((G, K, v), dtype),
        codes_0: T.Buffer((NV, L), CD),
        res_centroids_0: T.Buffer((G, KR1, v), dtype),
        res_codes_0: T.Buffer((NV, L), RCD),
        outlier_centroids_0: T.Buffer((KO, VO), dtype),
        outlier_codes_0: T.Buffer((NO, OSZ1), "uint16"),
        perm_0: T.Buffer((I,), "int32"),
        col_scale_0: T.Buffer((I,), dtype),
        weight_bias_0: T.Buffer((I,), dtype),
        xs_1: T.Buffer((NB, I), dtype),
        dot_1: T.Buffer((NB, 1), "float32"),
        centroids_1: T.Buffer((G, K, v), dtype),
        codes_1: T.Buffer((NV, L), CD),
        res_centroids_1: T.Buffer((G, KR1, v), dtype),
        res_codes_1: T.Buffer((NV, L), RCD),
        outlier_centroids_1: T.Buffer((KO, VO), dtype),
        outlier_codes_1: T.Buffer((NO, OSZ1), "uint16"),
        perm_1: T.Buffer((I,), "int32"),
        col_scale_1: T.Buffer((I,), dtype),
        weight_bias_1: T.Buffer((I,), dtype),
        xs_2: T.Buffer((NB, I), dtype),
        dot_2: T.Buffer((NB, 1), "float32"),
        centroids_2: T.Buffer((G, K, v), dtype),
        codes_2: T.Buffer((NV, L), CD),
        res_centroids_2: T.Buffer((G, KR1, v), dtype),
        res_codes_2: T.Buffer((NV, L), RCD),
        outlier_centroids_2: T.Buffer((KO, VO), dtype),
        outlier_codes_2: T.Buffer((NO, OSZ1), "uint16"),
        perm_2: T.Buffer((I,), "int32"),
        col_scale_2: T.Buffer((I,), dtype),
        weight_bias_2: T.Buffer((I,), dtype),
        w: T.Buffer((OT, I), dtype),
        y: T.Buffer((NB, OT), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        xf = T.decl_buffer((NB * I,), dtype, data=x.data)
        yf = T.decl_buffer((NB * OT,), dtype, data=y.data)
        w0 = T.decl_buffer((O, I), dtype, data=w.data)
        w1 = T.decl_buffer((O, I), dtype, data=w.data, elem_offset=O * I)
        w2 = T.decl_buffer((O, I), dtype, data=w.data, elem_offset=2 * O * I)
        if NB <= 0:  # nothing to do (the GEMM's row clamp needs a row)
            T.evaluate(0)
        elif FROM > 0 and NB < FROM:
            vq_rows(0, xs_0, centroids_0, codes_0, res_centroids_0, res_codes_0, outlier_centroids_0,
                    outlier_codes_0, dot_0, y)
            vq_rows(1, xs_1, centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1,
                    outlier_codes_1, dot_1, y)
            if THIRD:
                vq_rows(m2, xs_2, centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2,
                        outlier_codes_2, dot_2, y)
        else:
            dqs[0](centroids_0, codes_0, res_centroids_0, res_codes_0, outlier_centroids_0, outlier_codes_0, perm_0,
                   col_scale_0, weight_bias_0, w0)
            dqs[1](centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1, outlier_codes_1, perm_1,
                   col_scale_1, weight_bias_1, w1)
            if THIRD:
                dqs[m2](centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2, outlier_codes_2,
                        perm_2, col_scale_2, weight_bias_2, w2)
            gemm(xf, w, yf)

    operands = tuple(_fold_operands(cfg, p, False) for p in perms)
    keep = {"x", "w", "y"} | {f"{n}_{m}" for m, names in enumerate(operands) for n in ("xs", "dot", *names)}
    return keep_params(kernel, keep), operands, (((OT, I), dtype),)
