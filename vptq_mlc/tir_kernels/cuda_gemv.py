"""CUDA decode kernel (1..8 activation rows): codebook-lookup GEMV, written as hand-scheduled low-level TIR.

Layout `generic` (docs/ARCHITECTURE.md): `codes[i, k]` is the main code of vector row `i` at pre-perm column
`osz + k`; the entry `C[g, code, 0:v]` holds the `v` outputs `i*v .. i*v+v-1`. So one code load yields `v`
multiply-adds per activation row, and the kernel's bytes are almost all codes (2 B per v weights).

Schedule (docs/vq-gemv-h100.md §2):
- A CTA holds `R` vector rows x `P` input-dimension splits, one warp each (split-K for short matrices).
- Small codebooks (main + residual, all groups, <= SMEM_CODEBOOK_BYTES) are copied into shared memory once per
  CTA; larger ones are read through L1/L2 (K = 65536 is walled by L2 there: see bench/RESULTS.md).
- Each lane loads `VW` codes with one 16-byte load (and the matching activations), `U` chunks in flight before
  the first lookup; every lookup is one 16-byte (v=8) codebook read; fp32 accumulators per (row, j).
- Outlier columns (first `osz` inputs, their own codebook) are folded into the same accumulators.
- Lanes are reduced with warp shuffles, the `P` splits through shared memory; one warp-free store per output.
- With large codebooks the grid is persistent (CTAs loop over row blocks) to bound shared-memory refills.

The same TIR serves ROCm (`GpuParams`): lanes per warp are the wavefront (64 on CDNA gfx9, 32 on RDNA), the
scratch buffers are static `shared` (TVM's AMDGPU codegen rejects `shared.dyn`), and LDS (64 KB per workgroup)
bounds codebook + reduction scratch together; CUDA's parameters (`CUDA_PARAMS`) give the tuned CUDA kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.vq_layout import code_dtype
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.cuda_common import (
    KERNEL_ATTRS,
    fill_book_replicated,
    fma_entry,
    keep_params,
    load_book_entry,
    load_entry,
    pow2_floor,
    vr,
    warp_sum,
)
from vptq_mlc.tir_kernels.fused_input import PLAIN_INPUT, FusedInput
from vptq_mlc.tir_kernels.generic import kernel_dims

SMEM_CODEBOOK_BYTES = 64 * 1024  # fits twice per SM on sm_80/sm_90, once on sm_86/sm_89 (99 KB)
MAX_ROWS = 8
MAX_LAYERS = 3  # layers of one config that one GEMV launch serves (q/k/v)
# Shared memory serves a 16-byte load per lane in quarter-warp phases (8 lanes x 16 B = the 32 banks): 8 lanes that
# look up 8 random entries hit the same bank group ~2.6 times on average, so ~60% of the lookups' wavefronts were
# bank conflicts on the H100 (ncu). With REPLICAS copies laid out entry-major, lane `l` reads copy `l % 8`, whose
# bank group is its own: conflict-free, for codebooks small enough to store 8 times (K + Kr <= 512 at v = 8).
REPLICAS = 8
REPLICATED_CODEBOOK_BYTES = 64 * 1024
LARGE_SMEM_CODEBOOK = 32 * 1024  # shared-memory codebooks from this size on favour few, large CTAs (plan_gemv)


@dataclass(frozen=True)
class GpuParams:
    """What the GEMV schedule needs to know about the GPU (fixed at compile time: no device on the build box)."""

    warp_size: int = 32  # lanes reduced by warp shuffles: 32 (NVIDIA, RDNA wave32) or 64 (CDNA wave64)
    shared_scope: str = "shared.dyn"  # CUDA: dynamic smem (> 48 KB); ROCm: "shared" (no shared.dyn in AMDGPU codegen)
    smem_codebook_bytes: int = SMEM_CODEBOOK_BYTES  # codebooks up to this size are copied to shared memory
    smem_total_bytes: int | None = None  # per-block limit on codebook + reduction scratch (static LDS); None: unchecked
    max_threads: int = 1024  # threads per block


CUDA_PARAMS = GpuParams()


def wavefront_params(target) -> GpuParams:
    """The GEMV's parameters for a GPU whose kernels use static shared memory, read from its target's limits
    (wavefront, threads per block, LDS): what the ROCm backend (compile/rocm.py) builds with. CUDA: CUDA_PARAMS."""
    lds = int(target.attrs.get("max_shared_memory_per_block", 65536))
    return GpuParams(
        warp_size=int(target.attrs["thread_warp_size"]),
        shared_scope="shared",
        smem_codebook_bytes=lds,
        smem_total_bytes=lds,
        max_threads=int(target.attrs.get("max_threads_per_block", 256)),
    )


@dataclass(frozen=True)
class GemvPlan:
    rows_per_cta: int  # R
    splits: int  # P
    vec: int  # codes per lane load (VW)
    unroll: int  # chunks in flight per lane (U)
    entry_vec: int  # fp16 elements per codebook read
    smem_codebook: bool
    grid: int
    replicas: int = 1  # copies of each 16-byte codebook entry in shared memory (8: conflict-free lookups)
    half_acc: bool = False  # fp16 models: partial sums over each chunk of `vec` codes in fp16 (f16x2 math)

    @property
    def warps(self) -> int:
        return self.rows_per_cta * self.splits


def plan_gemv(cfg: VPTQLayerConfig, rows: int, dtype: str, params: GpuParams = CUDA_PARAMS) -> GemvPlan:
    """Heuristic launch shape (per layer shape, fixed at compile time; no device queries on the build box)."""
    el = 2 if dtype == "float16" else 4
    lanes = params.warp_size
    nv, length = cfg.num_vectors, cfg.group_num * cfg.group_size
    vec = 1
    for w in (8, 4, 2):
        if length % w == 0 and cfg.outlier_size % w == 0 and cfg.in_features % w == 0 and w * el <= 16:
            vec = w
            break
    # Enough warps in the whole grid (~4k: the H100 sweep in bench/RESULTS.md found 8k no better) but at least
    # one 16-byte load per lane per split. Accumulators are rows*v fp32 registers per lane: with many of them the
    # CTA must stay small, or __launch_bounds__ forces spills (v16 at 8 rows: 2.4 ms with 16 warps).
    acc_regs = rows * cfg.vector_len
    max_warps = 16 if acc_regs <= 32 else 8 if acc_regs <= 64 else 4
    max_warps = min(max_warps, pow2_floor(params.max_threads // lanes))
    splits = max(1, min(max_warps, pow2_floor(-(-4096 // nv)), pow2_floor(max(1, length // (lanes * vec)))))
    rows_per_cta = max(1, 8 // splits) if max_warps >= 8 else max(1, max_warps // splits)
    cb_bytes = cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * el
    if params is CUDA_PARAMS and LARGE_SMEM_CODEBOOK <= cb_bytes <= params.smem_codebook_bytes and acc_regs <= 32 \
            and nv <= 1024:
        # few vector rows and a large book: every CTA pays a 32-64 KB codebook copy, so use fewer, larger CTAs
        # (H100, v8-k4096-0 4096x4096: 16 warps as 4 rows x 4 splits 8.8 us vs 12.4 us with 8 warps x 512 CTAs)
        rows_per_cta, splits = 4, 4
    chunks_per_lane = -(-length // (vec * lanes * splits))
    # chunks in flight per lane; each holds rows*vec activations in registers too
    max_unroll = 4 if rows <= 2 else 2 if acc_regs <= 64 else 1
    unroll = min(max_unroll, 4 if chunks_per_lane >= 4 else 2 if chunks_per_lane >= 2 else 1)
    ev = 1
    for w in (8, 4, 2):
        if cfg.vector_len % w == 0 and w * el <= 16:
            ev = w
            break
    smem = cb_bytes <= params.smem_codebook_bytes
    if params.smem_total_bytes is not None:  # static LDS holds the split-reduction scratch too
        smem = smem and cb_bytes + rows_per_cta * splits * rows * cfg.vector_len * 4 <= params.smem_total_bytes
    blocks = -(-nv // rows_per_cta)
    reps = 1
    if smem and params is CUDA_PARAMS and cfg.vector_len * el == 16 \
            and REPLICAS * cb_bytes <= REPLICATED_CODEBOOK_BYTES:
        reps = REPLICAS
    # One CTA per row block. The kernel also supports a persistent grid (fewer CTAs looping over row blocks, so
    # the shared-memory codebook copy is paid once per CTA); on the H100 sweep it was 4-15% slower at the best
    # split, 64 KB codebooks included (bench/results/h100_gemv_schedule_sweep.json).
    grid = blocks
    # fp16 partial sums per chunk of `vec` codes halve the instructions per code (H100: k256-256 10-26% faster,
    # relative L2 error 5e-4 instead of 2e-4); CUDA only (the ROCm kernels are not measured on hardware). Not with
    # 128+ accumulators (v16 at 8 rows: 55 -> 68 us, the fp16 copies cost registers)
    half_acc = params is CUDA_PARAMS and dtype == "float16" and acc_regs <= 96
    return GemvPlan(rows_per_cta, splits, vec, unroll, ev, smem, grid, reps, half_acc)


def _stage_vec(in_features: int, el: int) -> int:
    """Elements per staging access of the fused prologue (16 bytes where the width allows)."""
    return next((w for w in (8, 4, 2) if in_features % w == 0 and w * el <= 16), 1)


def fused_staging_bytes(cfg: VPTQLayerConfig, rows: int, dtype: str, plan: GemvPlan | None = None) -> int:
    """Static shared memory of the fused prologue: the prepared activation rows + one dot partial per warp and row."""
    p = plan or plan_gemv(cfg, rows, dtype)
    return rows * cfg.in_features * (2 if dtype == "float16" else 4) + p.warps * rows * 4


def fused_prologue_fits(cfg: VPTQLayerConfig, rows: int, dtype: str) -> bool:
    """Whether the GEMV can stage the prepared activation itself (`vq_gemv_cuda(..., prologue=...)`): its rows fit
    static shared memory (48 KB) and, with the codebook and the split reduction, the 99 KB a CTA gets on sm_86/89
    (one library serves every arch)."""
    if not 1 <= rows <= MAX_ROWS:
        return False
    p = plan_gemv(cfg, rows, dtype)
    el = 2 if dtype == "float16" else 4
    staging = fused_staging_bytes(cfg, rows, dtype, p)
    book = cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * el * p.replicas \
        if p.smem_codebook else 0
    return staging <= FUSED_STATIC_SMEM and staging + book + p.warps * rows * cfg.vector_len * 4 <= FUSED_TOTAL_SMEM


FUSED_STATIC_SMEM = 48 * 1024  # static shared memory per CTA
FUSED_TOTAL_SMEM = 99 * 1024  # static + dynamic per CTA on sm_86/sm_89 (sm_80: 163 KB, sm_90: 227 KB)




def vq_gemv_cuda(cfg: VPTQLayerConfig, dtype: str, rows: int, plan: GemvPlan | None = None,
                 params: GpuParams = CUDA_PARAMS, count: int = 1,
                 prologue: tuple[bool, ...] | None = None, fused: FusedInput = PLAIN_INPUT,
                 two_launch: bool = False) -> tirx.PrimFunc:
    """PrimFunc(xs[rows, I], *operands, y[rows, O]) for 1 <= rows <= MAX_ROWS (static); `params` picks the GPU
    (CUDA_PARAMS, or `wavefront_params(rocm_target)`). `count` (2..MAX_LAYERS) layers of the same config in one
    launch (q/k/v, gate/up): PrimFunc(xs_0, *operands_0, xs_1, *operands_1, .., y_0, y_1, ..).

    `prologue` (CUDA, normed layers; one flag per layer: has a permutation): the GEMV prepares the activation
    itself, so a normed linear is one launch instead of prologue kernel + GEMV:
    PrimFunc(x[rows, I], then per layer m [perm_m], col_scale_m, weight_bias_m, *operands_m, then y_0, ..) with
    `y = vq(x[:, perm] * col_scale) + x @ weight_bias`. Every CTA copies the raw rows into shared memory (16-byte
    loads), gathers and scales them there (a gather from shared memory: the same gather from global memory is
    L1-sector bound, ~2.5 us for 4096 columns on one SM) and sums the norm-bias dot, overlapped with the codebook
    copy; xs is bit for bit what the prologue kernel writes, the dot is added in fp32 before the one rounding.
    `fused` adds the neighbours (`FusedInput`): the params become (x, [x2], [gamma], per layer .., [residual], y..).
    `two_launch` (with `prologue`): the same computation as two kernels of one PrimFunc, the prologue kernel
    (`cuda_prologue.prepare_scale_dot`, its neighbour folded in) writing each layer's xs and dot into scratch outputs
    the GEMV kernel then reads, adding the dot (and residual) in its epilogue: the launches saved without every CTA
    preparing the whole activation again. Params (.., [residual], xs_0, dot_0, .., y_0, ..)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"vq_gemv_cuda handles 1..{MAX_ROWS} rows, got {rows}")
    if prologue is not None:
        count = len(prologue)
        if fused.source not in ("x", "rmsnorm", "swiglu") or (fused.residual and (count != 1 or fused.concat)):
            raise ValueError(f"bad fused input {fused} for {count} layers")
        if params is not CUDA_PARAMS or not cfg.enable_norm or not (two_launch or fused_prologue_fits(cfg, rows,
                                                                                                    dtype)):
            raise ValueError(f"the fused prologue needs a normed layer on CUDA whose {rows} activation rows fit "
                             "shared memory (fused_prologue_fits; two_launch: any rows)")
    if not 1 <= count <= MAX_LAYERS:
        raise ValueError(f"vq_gemv_cuda serves 1..{MAX_LAYERS} layers in one launch, got {count}")
    p = plan or plan_gemv(cfg, rows, dtype, params)
    WARP, SCOPE = params.warp_size, params.shared_scope
    if WARP & (WARP - 1) or not 2 <= WARP <= 64:
        raise ValueError(f"warp size must be a power of two in 2..64, got {WARP}")
    I, O, v, G, S, K, KR, KR1, NV, L, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    NB = rows
    R, P, VW, U, EV = p.rows_per_cta, p.splits, p.vec, p.unroll, p.entry_vec
    W = R * P
    NT = W * WARP
    GRID = p.grid
    NRB = -(-NV // R)  # row blocks
    NCH = -(-L // VW)  # chunks of VW codes
    CPS = -(-NCH // P)  # chunks per split
    ITERS = -(-CPS // (WARP * U))
    REP = p.replicas if p.smem_codebook else 1
    CB_MAIN = G * K * v * REP  # shared-memory elements: the main codebook, then the residual one
    CB_RES = G * KR * v * REP if HAS_RES else 0
    CB_ALL = CB_MAIN + CB_RES
    SMEM_CB = p.smem_codebook
    if REP > 1 and (v != EV or REP * v * (2 if dtype == "float16" else 4) != 128 or WARP % REP):
        raise ValueError(f"a replicated codebook needs 16-byte entries read at once and {REP} | warp size")
    CB_SHARED = CB_ALL if SMEM_CB else 1
    FILL_MAIN = -(-(G * K) // NT)  # fill iterations per thread (unrolled, so the loads overlap)
    FILL_RES = -(-(G * KR) // NT) if HAS_RES else 0
    NBV = NB * v
    CD, RCD = code_dtype(K), code_dtype(KR1)  # uint8 codes for books of <= 256 entries
    HALF = p.half_acc and dtype == "float16"
    OPW = -(-OSZ1 // P)  # outlier columns per split
    OITERS = -(-OPW // WARP)
    RED = W * NBV
    ACC = "float32"
    SV = _stage_vec(I, 2 if dtype == "float16" else 4)  # fused prologue: elements per staging access
    SITERS = -(-I // (NT * SV))  # staging accesses per thread and row
    SOURCE, EPS, RESIDUAL, CONCAT = fused.source, fused.eps, fused.residual, fused.concat

    @T.macro
    def stage_activation(x, x2, gamma, perm, col_scale, weight_bias, xs_s, dred, nred, dacc, rstd, sg, sw, su, gl,
                         tid, tx, ty, has_perm):
        """The layer's input rows into `xs_s` (scaled by col_scale unless a permutation must gather first), each
        warp's partial norm-bias dots into `dred[warp * NB + b]`; with a permutation, after a barrier, each thread
        gathers and scales its columns into `gl` (written back once every thread has read: `gemv_body`).
        SOURCE: "x" the rows of `x`; "rmsnorm" RMSNorm(x) * gamma as TVM's rms_norm computes it (fp32, one
        rounding; the squares summed over the CTA first); "swiglu" silu(x) * x2 (silu in fp32, rounded, times x2)."""
        if SOURCE == "rmsnorm":
            for b in T.unroll(NB):
                dacc[b] = T.float32(0)
                for it in T.unroll(SITERS):
                    if (it * NT + tid) * SV < I:  # the raw columns stay in registers (`gl`) until rstd is known
                        gl[vr((b * SITERS + it) * SV, SV)] = x[b, vr((it * NT + tid) * SV, SV)]
                        for j in T.unroll(SV):
                            dacc[b] = dacc[b] + T.Cast(ACC, gl[(b * SITERS + it) * SV + j]) * T.Cast(
                                ACC, gl[(b * SITERS + it) * SV + j])
            warp_sum(dacc, NB, WARP, WARP)
            if tx == 0:
                for b in T.unroll(NB):
                    nred[ty * NB + b] = dacc[b]
            T.tvm_storage_sync("shared")
            for b in T.unroll(NB):
                rstd[b] = T.float32(0)
                for w in T.unroll(W):
                    rstd[b] = rstd[b] + nred[w * NB + b]
                rstd[b] = T.rsqrt(rstd[b] / T.float32(I) + T.float32(EPS))
        for b in T.unroll(NB):
            dacc[b] = T.float32(0)
            for it in T.unroll(SITERS):
                if (it * NT + tid) * SV < I:
                    if SOURCE == "rmsnorm":
                        sg[vr(0, SV)] = gl[vr((b * SITERS + it) * SV, SV)]
                        sw[vr(0, SV)] = gamma[vr((it * NT + tid) * SV, SV)]
                        for j in T.unroll(SV):
                            sg[j] = T.Cast(dtype, T.Cast(ACC, sg[j]) * rstd[b] * T.Cast(ACC, sw[j]))
                    elif SOURCE == "swiglu":
                        sg[vr(0, SV)] = x[b, vr((it * NT + tid) * SV, SV)]
                        su[vr(0, SV)] = x2[b, vr((it * NT + tid) * SV, SV)]
                        for j in T.unroll(SV):
                            sg[j] = T.Cast(dtype, T.Cast(ACC, sg[j]) * T.sigmoid(T.Cast(ACC, sg[j]))) * su[j]
                    else:
                        sg[vr(0, SV)] = x[b, vr((it * NT + tid) * SV, SV)]
                    sw[vr(0, SV)] = weight_bias[vr((it * NT + tid) * SV, SV)]
                    for j in T.unroll(SV):
                        dacc[b] = dacc[b] + T.Cast(ACC, sg[j]) * T.Cast(ACC, sw[j])
                    if not has_perm:
                        sw[vr(0, SV)] = col_scale[vr((it * NT + tid) * SV, SV)]
                        for j in T.unroll(SV):
                            sg[j] = sg[j] * sw[j]
                    xs_s[vr(b * I + (it * NT + tid) * SV, SV)] = sg[vr(0, SV)]
        warp_sum(dacc, NB, WARP, WARP)
        if tx == 0:
            for b in T.unroll(NB):
                dred[ty * NB + b] = dacc[b]
        if has_perm:
            T.tvm_storage_sync("shared")
            for b in T.unroll(NB):
                for it in T.unroll(SITERS):
                    if (it * NT + tid) * SV < I:
                        for j in T.unroll(SV):
                            gl[(b * SITERS + it) * SV + j] = xs_s[b * I + perm[(it * NT + tid) * SV + j]] * col_scale[
                                (it * NT + tid) * SV + j]

    @T.macro
    def gemv_body(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, bx, tx, ty,
                  cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot, fused, has_perm, perm, col_scale, weight_bias, xs_s,
                  dred, dacc, sg, sw, gl, x2, gamma, nred, rstd, su, res, yoff, epi, dot):
        tid = ty * WARP + tx
        rr = ty // P
        sp = ty % P
        # the book in shared memory: entry t's copy q at (t * REP + q) * v (REP = 1: the plain book); thread t stores
        # copy (q + t) % REP at step q, so a quarter-warp's stores hit 8 different bank groups
        if SMEM_CB:
            fill_book_replicated(cb_s, 0, wl, centroids, G * K, K, FILL_MAIN, NT, tid, v, EV, REP)
            if HAS_RES:
                fill_book_replicated(cb_s, CB_MAIN, wr, res_centroids, G * KR, KR, FILL_RES, NT, tid, v, EV, REP)
        if fused:  # this CTA's copy of the prepared activation (its loads may overlap the codebook copy's)
            stage_activation(xs, x2, gamma, perm, col_scale, weight_bias, xs_s, dred, nred, dacc, rstd, sg, sw, su, gl,
                             tid, tx, ty, has_perm)
        if SMEM_CB:
            T.tvm_storage_sync(SCOPE)
        if fused:
            if has_perm:  # every thread holds its gathered columns in `gl`: once all reads are done, write them back
                T.tvm_storage_sync("shared")
                for b in T.unroll(NB):
                    for it in T.unroll(SITERS):
                        if (it * NT + tid) * SV < I:
                            xs_s[vr(b * I + (it * NT + tid) * SV, SV)] = gl[vr((b * SITERS + it) * SV, SV)]
            T.tvm_storage_sync("shared")
        for rb_it in range(-(-NRB // GRID)):
            rb = rb_it * GRID + bx
            i = rb * R + rr
            for a in T.unroll(NBV):
                acc[a] = T.float32(0)
                ah[a] = T.Cast(dtype, 0)
            if rb < NRB and i < NV:
                for it in range(ITERS):
                    # issue U chunk loads (codes + activations) before any lookup
                    for u in T.unroll(U):
                        c = sp * CPS + (it * U + u) * WARP + tx
                        if c < T.min((sp + 1) * CPS, NCH):
                            cl[vr(u * VW, VW)] = codes[i, vr(c * VW, VW)]
                            if HAS_RES:
                                rl[vr(u * VW, VW)] = res_codes[i, vr(c * VW, VW)]
                            for b in T.unroll(NB):
                                if fused:
                                    xl[vr((u * NB + b) * VW, VW)] = xs_s[vr(b * I + OSZ + c * VW, VW)]
                                else:
                                    xl[vr((u * NB + b) * VW, VW)] = xs[b, vr(OSZ + c * VW, VW)]
                    for u in T.unroll(U):
                        c = sp * CPS + (it * U + u) * WARP + tx
                        if c < T.min((sp + 1) * CPS, NCH):
                            for e in T.unroll(VW):
                                g = (c * VW + e) // S
                                code = T.Cast("int32", cl[u * VW + e])
                                if SMEM_CB:  # lane tx reads copy tx % REP
                                    load_entry(wl, cb_s, ((g * K + code) * REP + tx % REP) * v, v, EV)
                                else:
                                    load_book_entry(wl, centroids, g, code, v, EV)
                                if HAS_RES:
                                    rcode = T.Cast("int32", rl[u * VW + e])
                                    if SMEM_CB:
                                        load_entry(wr, cb_s, CB_MAIN + ((g * KR + rcode) * REP + tx % REP) * v, v, EV)
                                    else:
                                        load_book_entry(wr, res_centroids, g, rcode, v, EV)
                                if HALF:  # fp16 partial sums over this chunk's VW codes (HFMA: half the instructions)
                                    if HAS_RES:
                                        for j in T.unroll(v):
                                            wl[j] = wl[j] + wr[j]
                                    for b in T.unroll(NB):
                                        for j in T.unroll(v):
                                            ah[b * v + j] = ah[b * v + j] + xl[(u * NB + b) * VW + e] * wl[j]
                                else:
                                    for b in T.unroll(NB):
                                        xv = T.Cast(ACC, xl[(u * NB + b) * VW + e])
                                        if HAS_RES:
                                            for j in T.unroll(v):
                                                acc[b * v + j] = acc[b * v + j] + xv * (
                                                    T.Cast(ACC, wl[j]) + T.Cast(ACC, wr[j])
                                                )
                                        else:
                                            fma_entry(acc, b, v, xv, wl)
                            if HALF:
                                for a in T.unroll(NBV):
                                    acc[a] = acc[a] + T.Cast(ACC, ah[a])
                                    ah[a] = T.Cast(dtype, 0)
                if HAS_OUT:
                    for oit in range(OITERS):
                        ko = sp * OPW + oit * WARP + tx
                        if ko < T.min((sp + 1) * OPW, OSZ):
                            for j in T.unroll(v):
                                r = i * v + j
                                if r < O:
                                    oc = T.Cast("int32", outlier_codes[r // VO, ko])
                                    wo = T.Cast(ACC, outlier_centroids[oc, r % VO])
                                    for b in T.unroll(NB):
                                        if fused:
                                            acc[b * v + j] = acc[b * v + j] + T.Cast(ACC, xs_s[b * I + ko]) * wo
                                        else:
                                            acc[b * v + j] = acc[b * v + j] + T.Cast(ACC, xs[b, ko]) * wo
            # lanes -> lane 0 (warp shuffles), then splits -> one thread per output (shared memory)
            warp_sum(acc, NBV, WARP, WARP)
            # TVM's sync planner sees every shared.dyn buffer as one, so it orders these writes after the shared
            # codebook's reads with a barrier; written out here, where the planner put it, so it need not insert one
            # inside the multi-layer kernel's per-layer branch (which it cannot)
            if SMEM_CB and SCOPE == "shared.dyn":
                T.tvm_storage_sync(SCOPE)
            if tx == 0:
                for a in T.unroll(NBV):
                    red[ty * NBV + a] = acc[a]
            T.tvm_storage_sync(SCOPE)
            for oit in range(-(-(R * NBV) // NT)):
                o = oit * NT + tid
                if o < R * NBV:
                    orr = o // NBV
                    a = o % NBV
                    b = a // v
                    j = a % v
                    oi = rb * R + orr
                    r = oi * v + j
                    if rb < NRB and oi < NV and r < O:
                        tot[0] = T.float32(0)
                        for q in T.unroll(P):
                            tot[0] = tot[0] + red[(orr * P + q) * NBV + a]
                        if fused:  # + the norm-bias dot: the warps' partial sums of row b
                            for w in T.unroll(W):
                                tot[0] = tot[0] + dred[w * NB + b]
                        if epi:  # + the norm-bias dot the prologue launch wrote
                            tot[0] = tot[0] + dot[b, 0]
                        if (fused or epi) and RESIDUAL:  # the residual stream's add, as `y + residual` in the dtype
                            y[b, r] = T.Cast(dtype, tot[0]) + res[b, r]
                        elif (fused or epi) and CONCAT:  # layer m's columns of one [rows, count * O] output
                            y[b, yoff + r] = T.Cast(dtype, tot[0])
                        else:
                            y[b, r] = T.Cast(dtype, tot[0])
            T.tvm_storage_sync(SCOPE)


    # Operand buffers exist even when unused (kept tiny), so one function body serves every variant;
    # the parameter list itself follows vq_operand_shapes exactly.
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
        bx = T.launch_thread("blockIdx.x", GRID)
        tx = T.launch_thread("threadIdx.x", WARP)
        ty = T.launch_thread("threadIdx.y", W)
        cb_s = T.alloc_buffer((CB_SHARED,), dtype, scope=SCOPE)
        red = T.alloc_buffer((RED,), ACC, scope=SCOPE)
        acc = T.alloc_buffer((NBV,), ACC, scope="local")
        ah = T.alloc_buffer((NBV,), dtype, scope="local")
        cl = T.alloc_buffer((U * VW,), CD, scope="local")
        rl = T.alloc_buffer((U * VW,), RCD, scope="local")
        xl = T.alloc_buffer((U * NB * VW,), dtype, scope="local")
        wl = T.alloc_buffer((v,), dtype, scope="local")
        wr = T.alloc_buffer((v,), dtype, scope="local")
        tot = T.alloc_buffer((1,), ACC, scope="local")
        gemv_body(xs, centroids, codes, res_centroids, res_codes, outlier_centroids, outlier_codes, y, bx, tx, ty,
                  cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot, False, False, xs, xs, xs, xs, red, acc, xl, xl, xl,
                  xs, xs, red, acc, xl, xs, 0, False, red)

    if prologue is not None and two_launch:
        return _two_launch_gemv(gemv_body, prologue, fused, dtype, NB, I, G, K, v, KR1, NV, L, CD, RCD, KO, VO, NO,
                                OSZ1, O, GRID, WARP, W, SCOPE, CB_SHARED, RED, NBV, U, VW, cfg)
    if prologue is not None:
        return _fused_gemv(gemv_body, prologue, fused, dtype, NB, I, G, K, v, KR1, NV, L, CD, RCD, KO, VO, NO, OSZ1,
                           O, GRID, WARP, W, SCOPE, CB_SHARED, RED, NBV, U, VW, SITERS, SV, cfg)
    if count == 1:
        return keep_generic_operands(kernel, cfg)

    SYNC = SCOPE

    # `count` layers of this config in one launch: CTA bx serves layer bx // GRID as CTA bx % GRID of its own
    # launch would (the same instructions, so the same bits)
    @T.prim_func(private=True)
    def multi(
        xs_0: T.Buffer((NB, I), dtype),
        centroids_0: T.Buffer((G, K, v), dtype),
        codes_0: T.Buffer((NV, L), CD),
        res_centroids_0: T.Buffer((G, KR1, v), dtype),
        res_codes_0: T.Buffer((NV, L), RCD),
        outlier_centroids_0: T.Buffer((KO, VO), dtype),
        outlier_codes_0: T.Buffer((NO, OSZ1), "uint16"),
        xs_1: T.Buffer((NB, I), dtype),
        centroids_1: T.Buffer((G, K, v), dtype),
        codes_1: T.Buffer((NV, L), CD),
        res_centroids_1: T.Buffer((G, KR1, v), dtype),
        res_codes_1: T.Buffer((NV, L), RCD),
        outlier_centroids_1: T.Buffer((KO, VO), dtype),
        outlier_codes_1: T.Buffer((NO, OSZ1), "uint16"),
        xs_2: T.Buffer((NB, I), dtype),
        centroids_2: T.Buffer((G, K, v), dtype),
        codes_2: T.Buffer((NV, L), CD),
        res_centroids_2: T.Buffer((G, KR1, v), dtype),
        res_codes_2: T.Buffer((NV, L), RCD),
        outlier_centroids_2: T.Buffer((KO, VO), dtype),
        outlier_codes_2: T.Buffer((NO, OSZ1), "uint16"),
        y_0: T.Buffer((NB, O), dtype),
        y_1: T.Buffer((NB, O), dtype),
        y_2: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        bx = T.launch_thread("blockIdx.x", GRID * count)
        tx = T.launch_thread("threadIdx.x", WARP)
        ty = T.launch_thread("threadIdx.y", W)
        cb_s = T.alloc_buffer((CB_SHARED,), dtype, scope=SCOPE)
        red = T.alloc_buffer((RED,), ACC, scope=SCOPE)
        acc = T.alloc_buffer((NBV,), ACC, scope="local")
        ah = T.alloc_buffer((NBV,), dtype, scope="local")
        cl = T.alloc_buffer((U * VW,), CD, scope="local")
        rl = T.alloc_buffer((U * VW,), RCD, scope="local")
        xl = T.alloc_buffer((U * NB * VW,), dtype, scope="local")
        wl = T.alloc_buffer((v,), dtype, scope="local")
        wr = T.alloc_buffer((v,), dtype, scope="local")
        tot = T.alloc_buffer((1,), ACC, scope="local")
        if bx < GRID:
            gemv_body(xs_0, centroids_0, codes_0, res_centroids_0, res_codes_0, outlier_centroids_0,
                      outlier_codes_0, y_0, bx, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot, False, False,
                      xs_0, xs_0, xs_0, xs_0, red, acc, xl, xl, xl,
                      xs_0, xs_0, red, acc, xl, xs_0, 0, False, red)
        # the CTA's branch is uniform, but the sync planner sees the next branch's shared-memory writes after this
        # one's reads: a barrier here, outside any condition, orders them (else it would put one inside a branch)
        T.tvm_storage_sync(SYNC)
        if bx // GRID == 1:
            gemv_body(xs_1, centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1,
                      outlier_codes_1, y_1, bx - GRID, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot, False,
                      False, xs_1, xs_1, xs_1, xs_1, red, acc, xl, xl, xl,
                      xs_1, xs_1, red, acc, xl, xs_1, 0, False, red)
        if count == 3:
            T.tvm_storage_sync(SYNC)
            if bx // GRID == 2:
                gemv_body(xs_2, centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2,
                          outlier_codes_2, y_2, bx - 2 * GRID, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr,
                          tot, False, False, xs_2, xs_2, xs_2, xs_2, red, acc, xl, xl, xl,
                          xs_2, xs_2, red, acc, xl, xs_2, 0, False, red)

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    names = ("xs", "y", *vq_operand_shapes(cfg))
    return keep_params(multi, {f"{name}_{m}" for name in names for m in range(count)})


def _fused_gemv(gemv_body, perms, opts: FusedInput, dtype, NB, I, G, K, v, KR1, NV, L, CD, RCD, KO, VO,  # noqa: E741
                NO, OSZ1, O, GRID, WARP, W, SCOPE, CB_SHARED, RED, NBV, U, VW, SITERS, SV, cfg) -> tirx.PrimFunc:
    """The GEMV with the prologue folded in (`vq_gemv_cuda(..., prologue=perms)`): one x, per layer its own
    [perm], col_scale, weight_bias and operands; CTA bx serves layer bx // GRID as in the shared GEMV."""
    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    count = len(perms)
    P0, P1, P2 = (*perms, False, False)[:3]
    ACC = "float32"
    OY = count * O if opts.concat else O  # columns of y_0

    @T.prim_func(private=True)
    def fused(
        x: T.Buffer((NB, I), dtype),
        x2: T.Buffer((NB, I), dtype),
        gamma: T.Buffer((I,), dtype),
        perm_0: T.Buffer((I,), "int32"),
        col_scale_0: T.Buffer((I,), dtype),
        weight_bias_0: T.Buffer((I,), dtype),
        centroids_0: T.Buffer((G, K, v), dtype),
        codes_0: T.Buffer((NV, L), CD),
        res_centroids_0: T.Buffer((G, KR1, v), dtype),
        res_codes_0: T.Buffer((NV, L), RCD),
        outlier_centroids_0: T.Buffer((KO, VO), dtype),
        outlier_codes_0: T.Buffer((NO, OSZ1), "uint16"),
        perm_1: T.Buffer((I,), "int32"),
        col_scale_1: T.Buffer((I,), dtype),
        weight_bias_1: T.Buffer((I,), dtype),
        centroids_1: T.Buffer((G, K, v), dtype),
        codes_1: T.Buffer((NV, L), CD),
        res_centroids_1: T.Buffer((G, KR1, v), dtype),
        res_codes_1: T.Buffer((NV, L), RCD),
        outlier_centroids_1: T.Buffer((KO, VO), dtype),
        outlier_codes_1: T.Buffer((NO, OSZ1), "uint16"),
        perm_2: T.Buffer((I,), "int32"),
        col_scale_2: T.Buffer((I,), dtype),
        weight_bias_2: T.Buffer((I,), dtype),
        centroids_2: T.Buffer((G, K, v), dtype),
        codes_2: T.Buffer((NV, L), CD),
        res_centroids_2: T.Buffer((G, KR1, v), dtype),
        res_codes_2: T.Buffer((NV, L), RCD),
        outlier_centroids_2: T.Buffer((KO, VO), dtype),
        outlier_codes_2: T.Buffer((NO, OSZ1), "uint16"),
        residual: T.Buffer((NB, O), dtype),
        y_0: T.Buffer((NB, OY), dtype),
        y_1: T.Buffer((NB, O), dtype),
        y_2: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        bx = T.launch_thread("blockIdx.x", GRID * count)
        tx = T.launch_thread("threadIdx.x", WARP)
        ty = T.launch_thread("threadIdx.y", W)
        cb_s = T.alloc_buffer((CB_SHARED,), dtype, scope=SCOPE)
        red = T.alloc_buffer((RED,), ACC, scope=SCOPE)
        xs_s = T.alloc_buffer((NB * I,), dtype, scope="shared")
        dred = T.alloc_buffer((W * NB,), ACC, scope="shared")
        nred = T.alloc_buffer((W * NB,), ACC, scope="shared")
        acc = T.alloc_buffer((NBV,), ACC, scope="local")
        ah = T.alloc_buffer((NBV,), dtype, scope="local")
        cl = T.alloc_buffer((U * VW,), CD, scope="local")
        rl = T.alloc_buffer((U * VW,), RCD, scope="local")
        xl = T.alloc_buffer((U * NB * VW,), dtype, scope="local")
        wl = T.alloc_buffer((v,), dtype, scope="local")
        wr = T.alloc_buffer((v,), dtype, scope="local")
        tot = T.alloc_buffer((1,), ACC, scope="local")
        dacc = T.alloc_buffer((NB,), ACC, scope="local")
        rstd = T.alloc_buffer((NB,), ACC, scope="local")
        sg = T.alloc_buffer((SV,), dtype, scope="local")
        sw = T.alloc_buffer((SV,), dtype, scope="local")
        su = T.alloc_buffer((SV,), dtype, scope="local")
        gl = T.alloc_buffer((NB * SITERS * SV,), dtype, scope="local")
        if bx < GRID:
            gemv_body(x, centroids_0, codes_0, res_centroids_0, res_codes_0, outlier_centroids_0, outlier_codes_0,
                      y_0, bx, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot, True, P0, perm_0, col_scale_0,
                      weight_bias_0, xs_s, dred, dacc, sg, sw, gl, x2, gamma, nred, rstd, su, residual, 0, False,
                      dred)
        if count >= 2:
            # uniform per CTA, but the sync planner sees the next layer's shared writes after this one's reads
            T.tvm_storage_sync(SCOPE)
            T.tvm_storage_sync("shared")
            if bx // GRID == 1:
                if opts.concat:
                    gemv_body(x, centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1,
                              outlier_codes_1, y_0, bx - GRID, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot,
                              True, P1, perm_1, col_scale_1, weight_bias_1, xs_s, dred, dacc, sg, sw, gl, x2, gamma,
                              nred, rstd, su, residual, O, False, dred)
                else:
                    gemv_body(x, centroids_1, codes_1, res_centroids_1, res_codes_1, outlier_centroids_1,
                              outlier_codes_1, y_1, bx - GRID, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot,
                              True, P1, perm_1, col_scale_1, weight_bias_1, xs_s, dred, dacc, sg, sw, gl, x2, gamma,
                              nred, rstd, su, residual, 0, False, dred)
        if count == 3:
            T.tvm_storage_sync(SCOPE)
            T.tvm_storage_sync("shared")
            if bx // GRID == 2:
                if opts.concat:
                    gemv_body(x, centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2,
                              outlier_codes_2, y_0, bx - 2 * GRID, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr,
                              tot, True, P2, perm_2, col_scale_2, weight_bias_2, xs_s, dred, dacc, sg, sw, gl, x2,
                              gamma, nred, rstd, su, residual, 2 * O, False, dred)
                else:
                    gemv_body(x, centroids_2, codes_2, res_centroids_2, res_codes_2, outlier_centroids_2,
                              outlier_codes_2, y_2, bx - 2 * GRID, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr,
                              tot, True, P2, perm_2, col_scale_2, weight_bias_2, xs_s, dred, dacc, sg, sw, gl, x2,
                              gamma, nred, rstd, su, residual, 0, False, dred)

    keep = {"x"} | {f"{name}_{m}" for name in ("col_scale", "weight_bias", *vq_operand_shapes(cfg))
                    for m in range(count)}
    keep |= {f"perm_{m}" for m in range(count) if perms[m]}
    keep |= {"y_0"} if opts.concat else {f"y_{m}" for m in range(count)}
    keep |= {"x2"} if opts.source == "swiglu" else {"gamma"} if opts.source == "rmsnorm" else set()
    keep |= {"residual"} if opts.residual else set()
    return keep_params(fused, keep)


def _two_launch_gemv(gemv_body, perms, opts: FusedInput, dtype, NB, I, G, K, v, KR1, NV, L, CD, RCD, KO,  # noqa: E741
                     VO, NO, OSZ1, O, GRID, WARP, W, SCOPE, CB_SHARED, RED, NBV, U, VW, cfg) -> tirx.PrimFunc:
    """`vq_gemv_cuda(..., prologue=perms, fused=opts, two_launch=True)`: the prologue kernel (grid rows x column
    chunks x layers, as the shared prologue's) writes xs_m / dot_m, then the GEMV kernel (CTA bx serves layer
    bx // GRID as in the shared GEMV) reads them and adds dot_m (and the residual) before its one rounding."""
    from vptq_mlc.artifact.vq_layout import vq_operand_shapes
    from vptq_mlc.tir_kernels.cuda_prologue import THREADS as PT
    from vptq_mlc.tir_kernels.cuda_prologue import prepare_launch

    count = len(perms)
    P0, P1, P2 = (*perms, False, False)[:3]
    ACC = "float32"
    OY = count * O if opts.concat else O  # columns of y_0
    CH = -(-I // PT)  # prologue CTAs per row and layer
    SRC, EPS = opts.source, opts.eps

    @T.prim_func(private=True)
    def two(
        x: T.Buffer((NB, I), dtype),
        x2: T.Buffer((NB, I), dtype),
        gamma: T.Buffer((I,), dtype),
        perm_0: T.Buffer((I,), "int32"),
        col_scale_0: T.Buffer((I,), dtype),
        weight_bias_0: T.Buffer((I,), dtype),
        centroids_0: T.Buffer((G, K, v), dtype),
        codes_0: T.Buffer((NV, L), CD),
        res_centroids_0: T.Buffer((G, KR1, v), dtype),
        res_codes_0: T.Buffer((NV, L), RCD),
        outlier_centroids_0: T.Buffer((KO, VO), dtype),
        outlier_codes_0: T.Buffer((NO, OSZ1), "uint16"),
        perm_1: T.Buffer((I,), "int32"),
        col_scale_1: T.Buffer((I,), dtype),
        weight_bias_1: T.Buffer((I,), dtype),
        centroids_1: T.Buffer((G, K, v), dtype),
        codes_1: T.Buffer((NV, L), CD),
        res_centroids_1: T.Buffer((G, KR1, v), dtype),
        res_codes_1: T.Buffer((NV, L), RCD),
        outlier_centroids_1: T.Buffer((KO, VO), dtype),
        outlier_codes_1: T.Buffer((NO, OSZ1), "uint16"),
        perm_2: T.Buffer((I,), "int32"),
        col_scale_2: T.Buffer((I,), dtype),
        weight_bias_2: T.Buffer((I,), dtype),
        centroids_2: T.Buffer((G, K, v), dtype),
        codes_2: T.Buffer((NV, L), CD),
        res_centroids_2: T.Buffer((G, KR1, v), dtype),
        res_codes_2: T.Buffer((NV, L), RCD),
        outlier_centroids_2: T.Buffer((KO, VO), dtype),
        outlier_codes_2: T.Buffer((NO, OSZ1), "uint16"),
        residual: T.Buffer((NB, O), dtype),
        xs_0: T.Buffer((NB, I), dtype),
        dot_0: T.Buffer((NB, 1), "float32"),
        xs_1: T.Buffer((NB, I), dtype),
        dot_1: T.Buffer((NB, 1), "float32"),
        xs_2: T.Buffer((NB, I), dtype),
        dot_2: T.Buffer((NB, 1), "float32"),
        y_0: T.Buffer((NB, OY), dtype),
        y_1: T.Buffer((NB, O), dtype),
        y_2: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        prepare_launch(x, x2, gamma, perm_0, col_scale_0, weight_bias_0, perm_1, col_scale_1, weight_bias_1, perm_2,
                       col_scale_2, weight_bias_2, xs_0, dot_0, xs_1, dot_1, xs_2, dot_2, NB, count, P0, P1, P2, I, CH,
                       dtype, SRC, EPS)
        with T.launch_thread("blockIdx.x", GRID * count) as bx:
            with T.launch_thread("threadIdx.x", WARP) as tx:
                with T.launch_thread("threadIdx.y", W) as ty:
                    cb_s = T.alloc_buffer((CB_SHARED,), dtype, scope=SCOPE)
                    red = T.alloc_buffer((RED,), ACC, scope=SCOPE)
                    acc = T.alloc_buffer((NBV,), ACC, scope="local")
                    ah = T.alloc_buffer((NBV,), dtype, scope="local")
                    cl = T.alloc_buffer((U * VW,), CD, scope="local")
                    rl = T.alloc_buffer((U * VW,), RCD, scope="local")
                    xl = T.alloc_buffer((U * NB * VW,), dtype, scope="local")
                    wl = T.alloc_buffer((v,), dtype, scope="local")
                    wr = T.alloc_buffer((v,), dtype, scope="local")
                    tot = T.alloc_buffer((1,), ACC, scope="local")
                    if bx < GRID:
                        gemv_body(xs_0, centroids_0, codes_0, res_centroids_0, res_codes_0, outlier_centroids_0,
                                  outlier_codes_0, y_0, bx, tx, ty, cb_s, red, acc, ah, cl, rl, xl, wl, wr, tot,
                                  False, False, xs_0, xs_0, xs_0, xs_0, red, acc, xl, xl, xl, xs_0, xs_0, red, acc,
                                  xl, residual, 0, True, dot_0)
                    if count >= 2:
                        # uniform per CTA, but the sync planner sees the next layer's shared writes after these reads
                        T.tvm_storage_sync(SCOPE)
                        if bx // GRID == 1:
                            if opts.concat:
                                gemv_body(xs_1, centroids_1, codes_1, res_centroids_1, res_codes_1,
                                          outlier_centroids_1, outlier_codes_1, y_0, bx - GRID, tx, ty, cb_s, red,
                                          acc, ah, cl, rl, xl, wl, wr, tot, False, False, xs_1, xs_1, xs_1, xs_1, red,
                                          acc, xl, xl, xl, xs_1, xs_1, red, acc, xl, residual, O, True, dot_1)
                            else:
                                gemv_body(xs_1, centroids_1, codes_1, res_centroids_1, res_codes_1,
                                          outlier_centroids_1, outlier_codes_1, y_1, bx - GRID, tx, ty, cb_s, red,
                                          acc, ah, cl, rl, xl, wl, wr, tot, False, False, xs_1, xs_1, xs_1, xs_1, red,
                                          acc, xl, xl, xl, xs_1, xs_1, red, acc, xl, residual, 0, True, dot_1)
                    if count == 3:
                        T.tvm_storage_sync(SCOPE)
                        if bx // GRID == 2:
                            if opts.concat:
                                gemv_body(xs_2, centroids_2, codes_2, res_centroids_2, res_codes_2,
                                          outlier_centroids_2, outlier_codes_2, y_0, bx - 2 * GRID, tx, ty, cb_s,
                                          red, acc, ah, cl, rl, xl, wl, wr, tot, False, False, xs_2, xs_2, xs_2, xs_2,
                                          red, acc, xl, xl, xl, xs_2, xs_2, red, acc, xl, residual, 2 * O, True,
                                          dot_2)
                            else:
                                gemv_body(xs_2, centroids_2, codes_2, res_centroids_2, res_codes_2,
                                          outlier_centroids_2, outlier_codes_2, y_2, bx - 2 * GRID, tx, ty, cb_s,
                                          red, acc, ah, cl, rl, xl, wl, wr, tot, False, False, xs_2, xs_2, xs_2, xs_2,
                                          red, acc, xl, xl, xl, xs_2, xs_2, red, acc, xl, residual, 0, True, dot_2)

    keep = {"x"} | {f"{name}_{m}" for name in ("col_scale", "weight_bias", "xs", "dot", *vq_operand_shapes(cfg))
                    for m in range(count)}
    keep |= {f"perm_{m}" for m in range(count) if perms[m]}
    keep |= {"y_0"} if opts.concat else {f"y_{m}" for m in range(count)}
    keep |= {"x2"} if opts.source == "swiglu" else {"gamma"} if opts.source == "rmsnorm" else set()
    keep |= {"residual"} if opts.residual else set()
    return keep_params(two, keep)


def two_launch_scratch(in_features: int, dtype: str, rows: int, count: int) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The scratch outputs of `vq_gemv_cuda(..., two_launch=True)` for `count` layers, in parameter order: per
    layer the prepared activation [rows, I] and the fp32 norm-bias dot [rows, 1]."""
    return tuple(item for _ in range(count) for item in (((rows, in_features), dtype), ((rows, 1), "float32")))


def keep_generic_operands(func: tirx.PrimFunc, cfg: VPTQLayerConfig) -> tirx.PrimFunc:
    """Drop the parameters this variant does not have, so the signature is (xs, *vq_operand_shapes, y)."""
    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    return keep_params(func, {"xs", "y", *vq_operand_shapes(cfg)})


def row_dot_cuda(in_features: int, dtype: str, threads: int = 256) -> tirx.PrimFunc:
    """`s[b, 0] = sum_i x[b, i] * w[i]` in fp32 for any row count: one block per row, the reduction split over
    `threads` threads (TVM lowers the thread-bound reduction loop to a warp/shared-memory allreduce)."""
    from tvm import te

    n = tirx.Var("n", "int64")
    x = te.placeholder((n, in_features), dtype, name="x")
    w = te.placeholder((in_features,), dtype, name="w")
    k = te.reduce_axis((0, in_features), name="k")
    s = te.compute((n, 1), lambda b, _: te.sum(x[b, k].astype("float32") * w[k].astype("float32"), axis=k),
                   name="row_dot")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, w, s]).without_attr("global_symbol"))
    b, _, kk = sch.get_loops(sch.get_sblock("row_dot"))
    _, ki = sch.split(kk, [None, threads])
    sch.bind(b, "blockIdx.x")
    sch.bind(ki, "threadIdx.x")
    return sch.mod["main"]

