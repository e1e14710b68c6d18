"""CUDA decode kernel for codebooks that do not fit shared memory (K = 65536 class): the code-sorted layout.

A plain gather from a 1 MiB codebook is served by L2 and walled at ~120 G lookups/s, i.e. fp16 speed
(docs/vq-gemv-h100.md §3). The converter therefore also writes every code as an entry grouped by
codebook slice (`artifact/vq_layout.py: code_sorted_layout`): list (gs, i) holds the entries `(k << bits) | local`
of vector row i whose combined code (main, or K + residual) lies in slice gs. Here:

- kernel 1, one CTA per (slice gs, block of RPC vector rows): the slice (SE entries x v, 64 KiB, plus a zero entry
  for padding) is copied into dynamic shared memory once, the activation rows too when they fit; teams of LPR lanes
  take one vector row each and stream its list with 16-byte loads (4 entries, U loads in flight per lane); every
  lookup hits the CTA's own shared memory; the team's partial row sums (v per activation row, fp32) are reduced
  with warp shuffles and stored to `partial[gs, b, i*v + j]`. Each (slice, output) partial is written exactly once:
  no atomics and no zeroing of an accumulator.
- kernel 2 (same PrimFunc, launched right after): `y[b, r] = sum over slices of partial + outlier term`, cast.
  The `partial` buffer is a second output of the call (planned by Relax like any intermediate), so the library
  allocates nothing at run time.
Residual codebooks as large as the main one are slices of the combined book, so both terms are summed exactly; a
small residual book is *folded* (layout.folds_residual): entries come from the main codes only, `cs_res` holds each
entry's residual code, and every CTA keeps the whole residual book in shared memory next to its slice. Outliers (a
few leading columns with their own small codebook) are added in kernel 2 from the generic outlier codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.artifact.vq_layout import code_sorted_geometry, folds_residual
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, fma_entry, keep_params, load_entry, vr, warp_sum
from vptq_mlc.tir_kernels.generic import kernel_dims

MAX_ROWS = 2  # batch 1..2 decode (vq-gemv-h100.md §3: batch 4+ loses with gather kernels)
SMEM_X_BYTES = 32 * 1024  # activation rows staged in shared memory up to this size (64 KiB slice + 32 KiB < 99 KB)
MAX_DYN_SMEM = 99 * 1024  # per block on sm_86/sm_89, the smallest of the default archs
REDUCE_THREADS = 256


@dataclass(frozen=True)
class CodeSortedPlan:
    warps: int  # W warps per CTA
    lanes_per_row: int  # LPR lanes stream one vector row's list together
    unroll: int  # U 16-byte entry loads in flight per lane
    ctas_per_slice: int  # C: CTAs sharing one slice (each takes ceil(N / C) vector rows)


def plan_code_sorted(cfg: VPTQLayerConfig, rows: int, dtype: str) -> CodeSortedPlan:
    """Launch shape: about 256 CTAs of 16 warps in all (one wave of ~2 per SM on 132-SM H100s; each CTA pays one
    64 KiB slice copy from L2), fewer when there are not enough vector rows for a team each. From the H100 sweep
    (bench/results/h100_kernels_code_sorted.json, v8-k65536-0, batch 1): 11008x4096 23.3 us with 16 CTAs per slice x 16
    warps vs 25.2 with 8 and 28.1 with 24; 4096x4096 14.1-15.6 us for 8-16 CTAs per slice."""
    geo = code_sorted_geometry(cfg, dtype)
    warps, lpr = 16, 8
    teams = warps * 32 // lpr
    c = max(1, min(-(-256 // geo.num_slices), -(-cfg.num_vectors // teams)))
    unroll = 2 if rows * cfg.vector_len <= 16 else 1
    return CodeSortedPlan(warps, lpr, unroll, c)


def code_sorted_preferred(cfg: VPTQLayerConfig, dtype: str, rows: int) -> bool:
    """Where the code-sorted kernel beat the L2 gather on the H100 (bench/RESULTS.md, rows 1 and 2): every slice
    must carry the same expected share of entries: no residual, a residual codebook as large as the main one, or a
    small one folded into the main pass (v8-k65536-256). Unfolded, a small residual becomes one or two slices
    holding an entry for every code: 3-5x slower than the gather (v12-k65536-4096 keeps the gather)."""
    return 1 <= rows <= MAX_ROWS and (cfg.num_res_centroids in (0, cfg.num_centroids) or folds_residual(cfg, dtype))


def _pow2_ok(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def code_sorted_scratch(cfg: VPTQLayerConfig, dtype: str, rows: int) -> tuple[int, ...]:
    """Shape of the fp32 `partial` output (one value per slice, activation row and vector-row output)."""
    geo = code_sorted_geometry(cfg, dtype)
    return (geo.num_slices * rows * cfg.num_vectors * cfg.vector_len,)


def vq_code_sorted_cuda(cfg: VPTQLayerConfig, dtype: str, rows: int,
                        plan: CodeSortedPlan | None = None) -> tirx.PrimFunc:
    """PrimFunc(xs[rows, I], centroids, [res_centroids], cs_entries, cs_offsets, [cs_res], [outlier_centroids,
    outlier_codes], partial (fp32 scratch output), y[rows, O])."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"vq_code_sorted_cuda handles 1..{MAX_ROWS} rows, got {rows}")
    p = plan or plan_code_sorted(cfg, rows, dtype)
    if not (_pow2_ok(p.lanes_per_row) and p.lanes_per_row <= 32):
        raise ValueError(f"lanes_per_row must be a power of two <= 32, got {p.lanes_per_row}")
    geo = code_sorted_geometry(cfg, dtype)
    el = 2 if dtype == "float16" else 4
    I, O, v, G, _, K, KR, KR1, NV, _, OSZ, OSZ1, HAS_RES, HAS_OUT, VO, KO, NO = kernel_dims(cfg)  # noqa: E741
    SE, NSG, NS, CB = geo.slice_entries, geo.slices_per_group, geo.num_slices, geo.code_bits
    CAP, NL = geo.entry_capacity, geo.num_lists
    NB, W, LPR, U, C = rows, p.warps, p.lanes_per_row, p.unroll, p.ctas_per_slice
    NT = W * 32
    TPW = 32 // LPR  # row teams per warp
    TEAMS = W * TPW
    RPC = -(-NV // C)  # vector rows per CTA
    RIT = -(-RPC // TEAMS)
    NVV = NV * v
    PART = NS * NB * NVV
    FOLD = geo.folded
    RD = geo.res_dtype or "uint8"
    L = geo.columns
    XV = 8 if I % 8 == 0 and el == 2 else 4 if I % 4 == 0 else 1
    XI = I + XV if FOLD else I  # x row stride in shared memory: folded pads read the zeros at column L (= I - OSZ)
    SLICE_S = (SE + 1) * v  # shared-memory elements: the slice + zero entry, then the folded residual book
    RES_S = KR * v if FOLD else 0
    X_SMEM = NB * XI * el <= SMEM_X_BYTES and (SLICE_S + RES_S + NB * XI) * el <= MAX_DYN_SMEM
    XS = NB * XI if X_SMEM else 1
    EV = 1
    for w in (8, 4, 2):
        if v % w == 0 and w * el <= 16:
            EV = w
            break
    MASK = (1 << CB) - 1
    VPE = v // EV  # vector chunks per codebook entry
    NIT = -(-(SE * VPE) // NT)  # slice-copy rounds per thread
    NRIT = -(-(KR * VPE) // NT) if FOLD else 0  # residual-book copy rounds per thread
    NXIT = -(-(NB * I // XV) // NT) if X_SMEM else 1
    NBV = NB * v
    ACC = "float32"
    NRED = -(-(NB * O) // REDUCE_THREADS)

    @T.prim_func(private=True)
    def kernel(
        xs: T.Buffer((NB, I), dtype),
        centroids: T.Buffer((G, K, v), dtype),
        res_centroids: T.Buffer((G, KR1, v), dtype),
        cs_entries: T.Buffer((CAP,), "uint32"),
        cs_offsets: T.Buffer((NL + 1,), "int32"),
        cs_res: T.Buffer((CAP if FOLD else 1,), RD),
        outlier_centroids: T.Buffer((KO, VO), dtype),
        outlier_codes: T.Buffer((NO, OSZ1), "uint16"),
        partial: T.Buffer((PART,), ACC),
        y: T.Buffer((NB, O), dtype),
    ):
        T.func_attr(KERNEL_ATTRS)
        with T.launch_thread("blockIdx.x", NS * C) as bx:
            tx = T.launch_thread("threadIdx.x", 32)
            ty = T.launch_thread("threadIdx.y", W)
            cb_s = T.alloc_buffer((SLICE_S + RES_S,), dtype, scope="shared.dyn")
            x_s = T.alloc_buffer((XS,), dtype, scope="shared.dyn")
            acc = T.alloc_buffer((NBV,), ACC, scope="local")
            ev = T.alloc_buffer((U * 4,), "uint32", scope="local")
            rv = T.alloc_buffer((U * 4,), RD, scope="local")
            wl = T.alloc_buffer((v,), dtype, scope="local")
            wr = T.alloc_buffer((v,), dtype, scope="local")
            stg = T.alloc_buffer((NIT * EV,), dtype, scope="local")
            stg_r = T.alloc_buffer((max(NRIT, 1) * EV,), dtype, scope="local")
            xst = T.alloc_buffer((NXIT * XV,), dtype, scope="local")
            bnd = T.alloc_buffer((2,), "int32", scope="local")
            tid = ty * 32 + tx
            gs = bx // C
            cc = bx % C
            g = gs // NSG
            s0 = (gs % NSG) * SE
            # the slice of the combined book [C_main[g]; C_res[g]] (+ a zero entry at SE for padding entries)
            # all loads of the slice (and of x below) are issued before any store: a loop of load->store rounds
            # waits one HBM latency per round (cold L2), which was most of the fixed cost of the first version
            for it in T.unroll(NIT):
                qc = it * NT + tid
                if qc < SE * VPE:
                    ce = s0 + qc // VPE
                    j0 = qc % VPE
                    if ce < K:
                        stg[vr(it * EV, EV)] = centroids[g, ce, vr(j0 * EV, EV)]
                    elif HAS_RES and not FOLD and ce < K + KR:
                        stg[vr(it * EV, EV)] = res_centroids[g, ce - K, vr(j0 * EV, EV)]
                    else:
                        stg[vr(it * EV, EV)] = T.Broadcast(T.Cast(dtype, 0), EV) if EV > 1 else T.Cast(dtype, 0)
            for it in T.unroll(NIT):
                qc = it * NT + tid
                if qc < SE * VPE:
                    cb_s[vr(qc * EV, EV)] = stg[vr(it * EV, EV)]
            # the padding entry, written with scalar stores: a buffer only ever accessed as one vector type would be
            # declared with that type (`extern __shared__ half4 cb_s_ptr[]` for v = 12), which clashes with the
            # same-named declaration of other kernels in one library (nvcc: "declaration is incompatible")
            if tid < v:
                cb_s[SE * v + tid] = T.Cast(dtype, 0)
            if FOLD:  # the whole residual book of group g, after the slice
                for it in T.unroll(NRIT):
                    qc = it * NT + tid
                    if qc < KR * VPE:
                        stg_r[vr(it * EV, EV)] = res_centroids[g, qc // VPE, vr((qc % VPE) * EV, EV)]
                for it in T.unroll(NRIT):
                    qc = it * NT + tid
                    if qc < KR * VPE:
                        cb_s[vr(SLICE_S + qc * EV, EV)] = stg_r[vr(it * EV, EV)]
            if X_SMEM:
                for it in T.unroll(NXIT):
                    t = it * NT + tid
                    if t < NB * I // XV:
                        xst[vr(it * XV, XV)] = xs[(t * XV) // I, vr((t * XV) % I, XV)]
                for it in T.unroll(NXIT):
                    t = it * NT + tid
                    if t < NB * I // XV:
                        x_s[vr(((t * XV) // I) * XI + (t * XV) % I, XV)] = xst[vr(it * XV, XV)]
                if FOLD and tid < NB * XV:
                    x_s[(tid // XV) * XI + I + tid % XV] = T.Cast(dtype, 0)

            T.tvm_storage_sync("shared")
            team = ty * TPW + tx // LPR
            q = tx % LPR
            for rit in range(RIT):
                lr = rit * TEAMS + team
                i = cc * RPC + lr
                for a in T.unroll(NBV):
                    acc[a] = T.float32(0)
                if lr < RPC and i < NV:
                    bnd[0] = cs_offsets[gs * NV + i]
                    bnd[1] = cs_offsets[gs * NV + i + 1]
                    for it2 in range((bnd[1] - bnd[0] + LPR * U - 1) // (LPR * U)):
                        for u in T.unroll(U):
                            ch = bnd[0] + (it2 * U + u) * LPR + q
                            if ch < bnd[1]:
                                ev[T.Ramp(u * 4, 1, 4)] = cs_entries[T.Ramp(ch * 4, 1, 4)]
                                if FOLD:
                                    rv[T.Ramp(u * 4, 1, 4)] = cs_res[T.Ramp(ch * 4, 1, 4)]
                        for u in T.unroll(U):
                            ch = bnd[0] + (it2 * U + u) * LPR + q
                            if ch < bnd[1]:
                                for e in T.unroll(4):
                                    lc = T.Cast("int32", ev[u * 4 + e] & T.uint32(MASK))
                                    col = T.Cast("int32", ev[u * 4 + e] >> T.uint32(CB))
                                    load_entry(wl, cb_s, lc * v, v, EV)
                                    if FOLD:
                                        load_entry(wr, cb_s, SLICE_S + T.Cast("int32", rv[u * 4 + e]) * v, v, EV)
                                        for j in T.unroll(v):
                                            wl[j] = wl[j] + wr[j]
                                    for b in T.unroll(NB):
                                        if X_SMEM:
                                            xv = T.Cast(ACC, x_s[b * XI + OSZ + col])
                                            fma_entry(acc, b, v, xv, wl)
                                        elif FOLD:  # pads point at column L, past the row: a zero activation
                                            xg = T.if_then_else(col < L, T.Cast(ACC, xs[b, T.min(OSZ + col, I - 1)]),
                                                                T.float32(0))
                                            fma_entry(acc, b, v, xg, wl)
                                        else:
                                            xg = T.Cast(ACC, xs[b, OSZ + col])
                                            fma_entry(acc, b, v, xg, wl)
                # team lanes -> lane q == 0 (every lane of the warp takes part in the shuffles)
                warp_sum(acc, NBV, LPR, 32)
                if q == 0 and lr < RPC and i < NV:
                    for b in T.unroll(NB):
                        for j in T.unroll(v):
                            partial[(gs * NB + b) * NVV + i * v + j] = acc[b * v + j]
        with T.launch_thread("blockIdx.x", NRED) as rbx:
            rtx = T.launch_thread("threadIdx.x", REDUCE_THREADS)
            tot = T.alloc_buffer((1,), ACC, scope="local")
            t2 = rbx * REDUCE_THREADS + rtx
            if t2 < NB * O:
                b2 = t2 // O
                r = t2 % O
                tot[0] = T.float32(0)
                for s in range(NS):
                    tot[0] = tot[0] + partial[(s * NB + b2) * NVV + r]
                if HAS_OUT:
                    for ko in range(OSZ):
                        oc = T.Cast("int32", outlier_codes[r // VO, ko])
                        tot[0] = tot[0] + T.Cast(ACC, xs[b2, ko]) * T.Cast(ACC, outlier_centroids[oc, r % VO])
                y[b2, r] = T.Cast(dtype, tot[0])

    return keep_params(kernel, {"xs", *code_sorted_operands(cfg, dtype), "partial", "y"})


def code_sorted_operands(cfg: VPTQLayerConfig, dtype: str) -> tuple[str, ...]:
    """Parameter names the kernel takes after `xs`, in order (tensor-cache suffixes)."""
    names = ["centroids"] + (["res_centroids"] if cfg.has_residual else []) + ["cs_entries", "cs_offsets"]
    names += ["cs_res"] if folds_residual(cfg, dtype) else []
    if cfg.has_outliers:
        names += ["outlier_centroids", "outlier_codes"]
    return tuple(names)
