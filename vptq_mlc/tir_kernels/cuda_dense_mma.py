"""CUDA dense fp16 GEMM on tensor cores, `y[..., N] = x[..., K] @ w[N, K]^T` (fp32 accumulate): every dense fp16
linear of a CUDA build (lm_head, and all linears of an fp16 model) instead of dlight's SIMT matmul schedule.

Why our own: dlight's tensor-core rule segfaults in apache-tvm 0.27 (compile/cuda.py switches it off), and the
SIMT schedule it falls back to ran these matmuls at 0.04-0.09x cuBLAS on prefill and 0.07-0.3x at 16 rows on the
H100 (docs/dense-mma.md).

Schedule (the classic Ampere GEMM, sm_80 and newer; mma.sync, no wgmma):
- A CTA owns a BM x BN tile of y; warps form a WM x WN x WK grid; a warp owns (16*MT) x (8*NT) outputs and one
  of WK interleaved BK-wide slices of every K step (WK > 1 is split-K inside the CTA, for few rows: the
  weight is then streamed by more warps; the slices are summed through shared memory at the end).
- Global -> shared with 16-byte `cp.async` into a STAGES-deep ring (one commit group per K step, one barrier
  per step), so STAGES-1 tiles of x and w are in flight while the tensor cores work on the current one.
- Shared tiles are K-major rows (x rows and w rows alike: y = x w^T is "row" x "col" for mma.sync) with the
  16-byte chunks XOR-swizzled by the row, so `ldmatrix.x4` (8 rows x 16 bytes per matrix) is bank-conflict free.
- Rows of x past M and rows of w past N are clamped to the last valid row (a real row, never stored), so the
  loads need no predicates; K must be a multiple of the CTA's K step (checked; the pass leaves others alone).

Plans (`plan_dense`, measured on the H100 in docs/dense-mma.md): decode rows (<= 16) take one 16-row tile with
warps splitting K (memory-bound: the weight is streamed once, at cuBLAS speed from 16 rows); prefill takes
128 x 128 tiles (64 x 64 for short prompts on narrow outputs). A symbolic row count gets one kernel per plan and
the host picks by the row count at run time. `dense_mma_pass` puts the kernel in the CUDA pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, grouped_tile, replace_prim_funcs
from vptq_mlc.tir_kernels.cuda_wgmma import WGMMA_FROM_ROWS, wgmma_prefill_macro, wgmma_supported

MAX_DYN_SMEM = 99 * 1024  # dynamic shared memory per block on sm_86/sm_89 (the smallest of the default archs)
DECODE_MAX_ROWS = 16  # static row counts up to this take the decode plan
# A static single row stays with dlight's GEMV rule (memory-bound, no tensor cores to gain): summed over a
# Llama-2-7B decode step our 1-row kernels (0.82-1.03x cuBLAS each) come to ~6.2 ms, and the fp16 build with dlight's
# GEMV already ran 5.85 ms per token on the same H100. Symbolic rows that happen to be 1 run our decode plan.
DLIGHT_GEMV_ROWS = 1


@dataclass(frozen=True)
class DensePlan:
    warps_m: int  # WM
    warps_n: int  # WN
    warps_k: int  # WK: split-K inside the CTA
    m_tiles: int  # MT: 16-row MMA tiles per warp
    n_tiles: int  # NT: 8-column MMA tiles per warp (even: ldmatrix.x4 loads two)
    k_slice: int  # BK: K columns per warp per step (multiple of 16)
    stages: int  # cp.async ring depth
    # CTA rasterization: 0 = blockIdx.x walks the output's column tiles (a 2-D grid); G > 0 = a 1-D grid walking
    # groups of G row tiles column by column, so the CTAs in flight share G row tiles of x and few weight tiles
    # (the weight is streamed from HBM about once when G covers every row tile)
    group_m: int = 0

    @property
    def block_m(self) -> int:
        return self.warps_m * self.m_tiles * 16

    @property
    def block_n(self) -> int:
        return self.warps_n * self.n_tiles * 8

    @property
    def block_k(self) -> int:
        return self.warps_k * self.k_slice

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n * self.warps_k

    def smem_bytes(self) -> int:
        ring = self.stages * (self.block_m + self.block_n) * self.block_k * 2
        red = (self.warps_k - 1) * self.warps_m * self.warps_n * 32 * self.m_tiles * self.n_tiles * 4 * 4
        return ring + red


# Plans and thresholds from one H100 run of bench/dense_mma.py --sweep (cold L2, Llama-2-7B shapes; docs/dense-mma.md):
# 1 row: BN = 64 with 4 K-warps was fastest (0.82-1.03x cuBLAS); 16 rows: BN = 16 with 8 K-warps (1.02-1.13x);
# 512 rows: 128 x 128 tiles with BK = 64, 3 stages (0.39-0.45x), then 4 warps of 64 x 64 instead of 8 of 64 x 32
# (bench/prefill_gemm.py, one later run: 1.05x / 1.07x the 8-warp plan summed over a 7B layer at 512 / 2048 rows,
# every output row within 2.2e-4 of the reference); few rows on a narrow output (128 rows x 4096):
# 64 x 64 tiles, so the grid fills the GPU (0.41-0.44x vs 0.27-0.30x).
DECODE_WIDE_PLAN = DensePlan(warps_m=1, warps_n=2, warps_k=4, m_tiles=1, n_tiles=4, k_slice=32, stages=4)
DECODE_PLAN = DensePlan(warps_m=1, warps_n=1, warps_k=8, m_tiles=1, n_tiles=2, k_slice=32, stages=4)
SMALL_PREFILL_PLAN = DensePlan(warps_m=2, warps_n=2, warps_k=1, m_tiles=2, n_tiles=4, k_slice=32, stages=4)
PREFILL_PLAN = DensePlan(warps_m=2, warps_n=2, warps_k=1, m_tiles=4, n_tiles=8, k_slice=64, stages=3)
PREFILL_PLAN_BK32 = DensePlan(warps_m=2, warps_n=4, warps_k=1, m_tiles=4, n_tiles=4, k_slice=32, stages=4)
WIDE_MAX_ROWS = 8  # static rows up to this take DECODE_WIDE_PLAN (measured at 1 row), above it DECODE_PLAN (16)
FULL_GRID_CTAS = 64  # below this many 128 x 128 tiles the symbolic kernel runs SMALL_PREFILL_PLAN


def _fit_k(plan: DensePlan, k: int) -> DensePlan | None:
    """`plan` with fewer K-warps until its K step divides `k`, or None."""
    while plan.warps_k > 1 and k % plan.block_k:
        plan = replace(plan, warps_k=plan.warps_k // 2)
    return plan if k % plan.block_k == 0 else None


def plan_dense(rows: int | None, k: int) -> DensePlan | None:
    """The plan for `rows` (None: symbolic, more than DECODE_MAX_ROWS) and inner size `k`, or None when K does
    not fit any plan (K must be a multiple of 32)."""
    if rows is not None and rows <= DECODE_MAX_ROWS:
        return _fit_k(DECODE_WIDE_PLAN if rows <= WIDE_MAX_ROWS else DECODE_PLAN, k)
    return _fit_k(PREFILL_PLAN, k) or _fit_k(PREFILL_PLAN_BK32, k)


def small_prefill_rows(n: int) -> int:
    """Symbolic row counts up to this (and above DECODE_MAX_ROWS) run SMALL_PREFILL_PLAN: 128 x 128 tiles would
    give fewer than FULL_GRID_CTAS CTAs. 0 when the output is wide enough for every row count."""
    tiles_n = -(-n // PREFILL_PLAN.block_n)
    return PREFILL_PLAN.block_m * ((FULL_GRID_CTAS - 1) // tiles_n) if tiles_n < FULL_GRID_CTAS else 0


def dense_supported(rows: int | None, n: int, k: int, dtype: str) -> bool:
    return dtype == "float16" and n >= 1 and plan_dense(rows, k) is not None


@dataclass(frozen=True)
class TileLayout:
    """Where plan `p` keeps things, as arithmetic that works on ints, numpy arrays and TIR expressions alike (the
    kernel and tests/test_dense_mma.py's CPU emulation use the same functions). Offsets are in fp16 elements."""

    p: DensePlan

    @property
    def chunks_per_row(self) -> int:  # 16-byte chunks per shared row (a row holds one K step)
        return self.p.block_k // 8

    def swizzle(self, row, chunk):
        """Physical chunk of logical `chunk` in shared row `row`: XOR with the row, so the 8 rows one ldmatrix
        matrix reads land in 8 different 16-byte bank groups (a 128-byte bank line holds 128 / (2 BK) rows)."""
        cr = self.chunks_per_row
        return chunk ^ ((row // max(1, 8 // cr)) % min(cr, 8))

    def x_slot(self, stage, row, chunk):
        """Offset of (x tile row, 16-byte chunk) in ring slot `stage`."""
        return stage * self.p.block_m * self.p.block_k + row * self.p.block_k + self.swizzle(row, chunk) * 8

    def w_slot(self, stage, row, chunk):
        p = self.p
        return (p.stages * p.block_m * p.block_k + stage * p.block_n * p.block_k + row * p.block_k
                + self.swizzle(row, chunk) * 8)

    def x_frag(self, stage, wm, wk, i, kk, lane):
        """The row address lane `lane` gives `ldmatrix.x4` for the A fragment of m-tile `i`, k16 step `kk`: lanes
        0-15 rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15 (registers a0/a1 | a2/a3 of mma.sync)."""
        p = self.p
        return self.x_slot(stage, wm * p.m_tiles * 16 + i * 16 + lane % 16,
                           (wk * p.k_slice + kk * 16) // 8 + lane // 16)

    def w_frag(self, stage, wn, wk, j, kk, lane):
        """The row address for the B fragments of n-tiles 2j and 2j+1 (w rows are the n index): matrices
        (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) from lanes 0-7, 8-15, 16-23, 24-31."""
        p = self.p
        return self.w_slot(stage, wn * p.n_tiles * 8 + j * 16 + lane // 16 * 8 + lane % 8,
                           (wk * p.k_slice + kk * 16) // 8 + lane // 8 % 2)

    def out_row(self, wm, i, lane, c):
        """CTA-local output row of accumulator `c` (0-3) of m-tile `i`: rows g and g + 8 (g = lane / 4)."""
        return wm * self.p.m_tiles * 16 + i * 16 + lane // 4 + c // 2 * 8

    def out_col(self, wn, j, lane, c):
        """CTA-local output column of accumulator `c` of n-tile `j`: columns 2q and 2q + 1 (q = lane % 4)."""
        return wn * self.p.n_tiles * 8 + j * 8 + lane % 4 * 2 + c % 2


def _gemm_macro(p: DensePlan, M, N: int, K: int, dtype: str, rows_static: int | None, add_bias: bool = False,
                add_residual: bool = False):
    """The kernel launch of plan `p` as a macro over flat x[M*K], w[N, K], y[M*N] (pasted into the caller);
    `add_bias`: the macro also takes bias[N] and adds it to the fp32 sum before the one rounding to `dtype`;
    `add_residual`: also res[M*N], added to the rounded output in `dtype` (as a separate `y + residual` pass)."""
    WM, WN, WK, MT, NT, BK, S = p.warps_m, p.warps_n, p.warps_k, p.m_tiles, p.n_tiles, p.k_slice, p.stages
    BM, BN, BKC, NTHR = p.block_m, p.block_n, p.block_k, p.threads
    CR = BKC // 8  # 16-byte chunks per shared row
    KT = K // BKC  # K steps
    A_CH, B_CH = BM * CR, BN * CR  # chunks per tile
    A_IT, B_IT = -(-A_CH // NTHR), -(-B_CH // NTHR)
    A_TILE, B_TILE = BM * BKC, BN * BKC
    NACC = MT * NT * 4
    RED = max(1, (WK - 1) * WM * WN * 32 * NACC)
    GRID_N = -(-N // BN)
    GRID_M = -(-rows_static // BM) if rows_static is not None else (M + BM - 1) // BM
    GM = p.group_m

    lay = TileLayout(p)

    @T.macro
    def load_step(ring, xf, w, slot, step, tid, bx, by):
        """cp.async of K step `step` of the CTA's x rows and w rows into ring slot `slot` (16 bytes a thread)."""
        for it in T.unroll(A_IT):
            if A_CH % NTHR == 0 or it * NTHR + tid < A_CH:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(ring[lay.x_slot(slot, (it * NTHR + tid) // CR, (it * NTHR + tid) % CR)]),
                    xf.access_ptr("r", offset=T.min(by * BM + (it * NTHR + tid) // CR, M - 1) * K
                                  + step * BKC + (it * NTHR + tid) % CR * 8),
                    16))
        for it in T.unroll(B_IT):
            if B_CH % NTHR == 0 or it * NTHR + tid < B_CH:
                T.evaluate(T.ptx["cp.async.cg.shared.global"](
                    T.address_of(ring[lay.w_slot(slot, (it * NTHR + tid) // CR, (it * NTHR + tid) % CR)]),
                    w.access_ptr("r", offset=T.min(bx * BN + (it * NTHR + tid) // CR, N - 1) * K
                                 + step * BKC + (it * NTHR + tid) % CR * 8),
                    16))

    def biased(total, bias, col):
        """The fp32 sum plus bias[col] with `add_bias` (a TIR expression)."""
        return total + T.Cast("float32", bias[col]) if add_bias else total

    def rounded(total, res, at):
        """The fp32 sum in `dtype`, plus res[at] there with `add_residual` (exact in fp32, rounded once)."""
        if not add_residual:
            return T.Cast(dtype, total)
        return T.Cast(dtype, T.Cast("float32", T.Cast(dtype, total)) + T.Cast("float32", res[at]))

    @T.macro
    def gemm(xf, w, yf, bias=None, res=None):
        if GM > 0:
            tb = T.launch_thread("blockIdx.x", GRID_M * GRID_N)
            gsz = T.min(GRID_M - tb // (GM * GRID_N) * GM, GM)
            bx = grouped_tile(tb, GRID_N, GM, gsz)[0]
            by = grouped_tile(tb, GRID_N, GM, gsz)[1]
        else:
            bx = T.launch_thread("blockIdx.x", GRID_N)
            by = T.launch_thread("blockIdx.y", GRID_M)
        tx = T.launch_thread("threadIdx.x", 32)
        ty = T.launch_thread("threadIdx.y", WM * WN * WK)
        ring = T.alloc_buffer((S * (A_TILE + B_TILE),), dtype, scope="shared.dyn")
        red = T.alloc_buffer((RED,), "float32", scope="shared.dyn")
        acc = T.alloc_buffer((NACC,), "float32", scope="local")
        fa = T.alloc_buffer((MT * 8,), dtype, scope="local")
        fb = T.alloc_buffer((NT * 4,), dtype, scope="local")
        tot = T.alloc_buffer((1,), "float32", scope="local")
        tid = ty * 32 + tx
        wk = ty % WK  # K slice of this warp
        wn = ty // WK % WN
        wm = ty // (WK * WN)
        for a in T.unroll(NACC):
            acc[a] = T.float32(0)
        # prologue: K steps 0 .. S-2 in flight, one commit group each
        for s in T.unroll(S - 1):
            if s < KT:
                load_step(ring, xf, w, s, s, tid, bx, by)
            T.evaluate(T.ptx["cp.async.commit_group"]())
        for kt in range(KT):
            T.evaluate(T.ptx["cp.async.wait_group"](S - 2))
            T.tvm_storage_sync("shared")
            # refill the slot every warp finished reading in the previous step
            if kt + S - 1 < KT:
                load_step(ring, xf, w, (kt + S - 1) % S, kt + S - 1, tid, bx, by)
            T.evaluate(T.ptx["cp.async.commit_group"]())
            for kk in T.unroll(BK // 16):
                for i in T.unroll(MT):
                    T.evaluate(T.ptx_legacy.ldmatrix(
                        False, 4, ".b16", fa.data, i * 8, ring.access_ptr("r"),
                        lay.x_frag(kt % S, wm, wk, i, kk, tx), dtype=dtype))
                for j in T.unroll(NT // 2):
                    T.evaluate(T.ptx_legacy.ldmatrix(
                        False, 4, ".b16", fb.data, j * 8, ring.access_ptr("r"),
                        lay.w_frag(kt % S, wn, wk, j, kk, tx), dtype=dtype))
                for i in T.unroll(MT):
                    for j in T.unroll(NT):
                        T.evaluate(T.ptx_legacy.mma(
                            "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                            fa.data, i * 8, fb.data, j * 4, acc.data, (i * NT + j) * 4, False, dtype="float32"))
        T.evaluate(T.ptx["cp.async.wait_group"](0))
        T.tvm_storage_sync("shared")
        # split-K warps 1..WK-1 park their accumulators; warp 0 of each (wm, wn) adds them and stores
        if WK > 1:
            if wk > 0:
                for a in T.unroll(NACC):
                    red[((((wm * WN + wn) * (WK - 1)) + wk - 1) * NACC + a) * 32 + tx] = acc[a]
            T.tvm_storage_sync("shared")
        if wk == 0:
            for i in T.unroll(MT):
                for j in T.unroll(NT):
                    for c in T.unroll(4):
                        tot[0] = acc[(i * NT + j) * 4 + c]
                        if WK > 1:
                            for s2 in T.unroll(WK - 1):
                                tot[0] = tot[0] + red[(((wm * WN + wn) * (WK - 1) + s2) * NACC
                                                       + (i * NT + j) * 4 + c) * 32 + tx]
                        if (by * BM + lay.out_row(wm, i, tx, c) < M
                                and bx * BN + lay.out_col(wn, j, tx, c) < N):
                            yf[(by * BM + lay.out_row(wm, i, tx, c)) * N
                               + bx * BN + lay.out_col(wn, j, tx, c)] = rounded(
                                biased(tot[0], bias, bx * BN + lay.out_col(wn, j, tx, c)), res,
                                (by * BM + lay.out_row(wm, i, tx, c)) * N + bx * BN + lay.out_col(wn, j, tx, c))


    return gemm


def _plan_checked(p: DensePlan | None, k: int, max_smem: int = MAX_DYN_SMEM) -> DensePlan:
    if p is None or k % p.block_k or p.n_tiles % 2 or p.k_slice % 16:
        raise ValueError(f"no dense MMA plan for K={k} (plan {p})")
    if p.smem_bytes() > max_smem:
        raise ValueError(f"dense MMA plan {p} needs {p.smem_bytes()} bytes of shared memory (> {max_smem})")
    return p


def symbolic_plans(n: int, k: int, above_rows: int = 0) -> list[tuple[int | None, DensePlan | None]]:
    """The run-time plan choice for a symbolic row count known to exceed `above_rows`: (row limit or None,
    plan), first match wins (decode rows, short prompts on narrow outputs, then 128 x 128 tiles)."""
    plans: list[tuple[int | None, DensePlan | None]] = []
    if above_rows < DECODE_MAX_ROWS:
        plans.append((DECODE_MAX_ROWS, plan_dense(DECODE_MAX_ROWS, k)))
    small = small_prefill_rows(n)
    if small > max(above_rows, DECODE_MAX_ROWS) and _fit_k(SMALL_PREFILL_PLAN, k) is not None:
        plans.append((small, _fit_k(SMALL_PREFILL_PLAN, k)))
    plans.append((None, plan_dense(None, k)))
    return plans


def gemm_macros(plans, M, n: int, k: int, dtype: str, rows_static: int | None,
                max_smem: int = MAX_DYN_SMEM, wgmma: bool = False,
                add_bias: bool = False, add_residual: bool = False) -> list[tuple[int, object]]:
    """(row limit, 0 for none; kernel-launch macro over flat x[M*K], w[N, K], y[M*N], bias[N] with `add_bias`
    and res[M*N] with `add_residual`) per plan of `plans`. `wgmma` (sm_90a builds only, cuda_wgmma.py): symbolic
    row counts from cuda_wgmma.WGMMA_FROM_ROWS run the wgmma kernels (`_wgmma_ladder`)."""
    if wgmma and rows_static is None and wgmma_supported(n, k, dtype):
        plans = _wgmma_ladder(plans)
    macros = []
    for limit, pl in plans:  # under a row limit that fits one tile the grid is one tile high
        if pl is _WGMMA:
            macros.append((0, wgmma_prefill_macro(M, n, k, add_bias, add_residual)))
            continue
        grid_rows = limit if limit is not None and limit <= pl.block_m else rows_static
        macros.append((limit or 0, _gemm_macro(_plan_checked(pl, k, max_smem), M, n, k, dtype, grid_rows,
                                               add_bias, add_residual)))
    return macros


_WGMMA = object()  # the plan slot of the wgmma kernels in a ladder (`_wgmma_ladder`)


def _wgmma_ladder(plans: list) -> list:
    """A symbolic-row ladder of mma.sync plans with the wgmma kernels from WGMMA_FROM_ROWS rows: the decode plan
    kept, the plan that served WGMMA_FROM_ROWS - 1 rows up to there, wgmma past it (at most three slots)."""
    decode = [(limit, pl) for limit, pl in plans if limit is not None and limit <= DECODE_MAX_ROWS]
    below = next(pl for limit, pl in plans if limit is None or limit >= WGMMA_FROM_ROWS - 1)
    return [*decode, (WGMMA_FROM_ROWS - 1, below), (None, _WGMMA)]


def dense_mma_cuda(lead: tuple, n: int, k: int, dtype: str = "float16", plan: DensePlan | None = None,
                   max_smem: int = MAX_DYN_SMEM, wgmma: bool = False) -> tirx.PrimFunc:
    """PrimFunc(x[*lead, K], w[N, K], y[*lead, N]); `lead` holds ints and/or int64 tirx.Vars (rows = their
    product). Static rows get their plan; symbolic rows get both kernels and pick at run time (a symbolic batch
    of decode rows must not run 128-row tiles: the weight would be streamed by N / 128 CTAs only). `plan`
    forces one plan for every row count (plan comparisons, bench/dense_mma.py). `wgmma`: symbolic rows past the
    mma.sync plans run the wgmma kernel (sm_90a builds only, `gemm_macros`)."""
    if dtype != "float16":
        raise ValueError(f"dense_mma_cuda takes fp16, got {dtype}")
    rows_static, Mi = dense_rows(lead)
    if plan is not None:
        plans = [(None, plan)]
    elif rows_static is not None:
        plans = [(None, plan_dense(rows_static, k))]
    else:
        plans = symbolic_plans(n, k)
    return dense_dispatch(lead, n, k, dtype, gemm_macros(plans, Mi, n, k, dtype, rows_static, max_smem,
                                                          wgmma=wgmma))


def dense_rows(lead: tuple):
    """(the static row count or None, the row count as the kernels index it: int32 inside the kernel, since
    indices stay below 2^31 for every shape we build: rows * max(N, K))."""
    rows_static = None
    if all(isinstance(d, int) for d in lead):
        rows_static = 1
        for d in lead:
            rows_static *= d
    M = 1
    for d in lead:
        M = M * d
    return rows_static, (M if isinstance(M, int) else T.Cast("int32", M))


def gemm_ladder(macros: list[tuple[int, object]], rows):
    """One macro over (xf, w, yf[, bias[, res]]) launching the first of `macros` ((row limit, 0 for none; GEMM
    macro)) whose limit the run-time row count `rows` meets; the last takes every other count. Shared by every
    dispatch over GEMM plans (dense, VQ dequantize + GEMM, folded prefill; CUDA and ROCm macros)."""
    (limit, first), rest = macros[0], macros[1:]
    if not rest:
        return first
    then = gemm_ladder(rest, rows)

    @T.macro
    def pick(xf, w, yf, bias=None, res=None):
        if rows <= limit:
            if res is not None:
                first(xf, w, yf, bias, res)
            elif bias is not None:
                first(xf, w, yf, bias)
            else:
                first(xf, w, yf)
        else:
            if res is not None:
                then(xf, w, yf, bias, res)
            elif bias is not None:
                then(xf, w, yf, bias)
            else:
                then(xf, w, yf)

    return pick


def dense_dispatch(lead: tuple, n: int, k: int, dtype: str, macros: list[tuple[int, object]]) -> tirx.PrimFunc:
    """PrimFunc(x[*lead, K], w[N, K], y[*lead, N]) launching the first of the kernel macros (`macros`: (row limit,
    0 for none; macro over flat x[M*K], w[N, K], y[M*N])) whose limit the run-time row count meets
    (`gemm_ladder`); zero rows launch nothing (the kernels' row clamp needs a row). Shared by the CUDA and ROCm
    dense GEMMs."""
    M = 1
    for d in lead:
        M = M * d
    XSHAPE, YSHAPE = tuple(lead) + (k,), tuple(lead) + (n,)
    ONE = len(macros) == 1
    gemm = gemm_ladder(macros, M)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr(KERNEL_ATTRS)
        x = T.match_buffer(x_h, XSHAPE, dtype)
        w = T.match_buffer(w_h, (n, k), dtype)
        y = T.match_buffer(y_h, YSHAPE, dtype)
        xf = T.decl_buffer((M * k,), dtype, data=x.data)
        yf = T.decl_buffer((M * n,), dtype, data=y.data)
        if ONE:
            gemm(xf, w, yf)
        elif M <= 0:  # nothing to do (the row clamp needs a row)
            T.evaluate(0)
        else:
            gemm(xf, w, yf)

    return kernel


def _loop_nest_block(stmt):
    """The single SBlock under a perfect loop nest (stripping the root block), or None."""
    from tvm import s_tir

    if isinstance(stmt, s_tir.SBlockRealize) and not stmt.block.iter_vars:  # the root block
        stmt = stmt.block.body
    while isinstance(stmt, tirx.For):
        stmt = stmt.body
    if isinstance(stmt, s_tir.SBlockRealize) and stmt.block.iter_vars:
        return stmt.block
    return None


def match_nt_matmul(func) -> tuple[tuple, int, int] | None:
    """(lead, N, K) when `func` is exactly `y[*lead, n] = sum_k x[*lead, k] * w[n, k]` in fp16 with static N, K
    and leading dims that are ints or plain variables (what LegalizeOps makes of an NT matmul), else None. Anything
    else (a fused epilogue, another dtype, a transposed operand) is left to dlight."""
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return None
    bufs = list(func.params)  # TVM 0.27: buffer parameters are buffer-typed vars (shape, dtype)
    if any(getattr(b, "shape", None) is None or str(b.dtype) != "float16" for b in bufs):
        return None
    x, w, y = bufs
    if len(w.shape) != 2 or not all(isinstance(d, tirx.IntImm) for d in w.shape) or len(x.shape) < 2:
        return None
    n, k = int(w.shape[0]), int(w.shape[1])
    lead = x.shape[:-1]
    if not isinstance(x.shape[-1], tirx.IntImm) or int(x.shape[-1]) != k or len(y.shape) != len(x.shape):
        return None
    if not isinstance(y.shape[-1], tirx.IntImm) or int(y.shape[-1]) != n:
        return None
    for a, b in zip(lead, y.shape[:-1]):
        if not (isinstance(a, (tirx.IntImm, tirx.Var)) and _same_dim(a, b)):
            return None
    block = _loop_nest_block(func.body)
    if block is None or len(block.iter_vars) != len(lead) + 2:
        return None
    iv = block.iter_vars
    kinds = [int(v.iter_type) for v in iv]
    if kinds != [0] * (len(lead) + 1) + [2]:  # DataPar ... DataPar, CommReduce
        return None
    for v, ext in zip(iv, list(y.shape) + [k]):
        if not (isinstance(v.dom.min, tirx.IntImm) and int(v.dom.min) == 0 and _same_dim(v.dom.extent, ext)):
            return None
    vs = [v.var for v in iv]
    init, body = block.init, block.body

    def is_access(node, buf, idx) -> bool:  # a load (TensorLoad: .source) or store (.buffer) of buf[idx]
        if isinstance(node, tvm.ir.TensorLoad):
            target = node.source
        elif isinstance(node, tirx.BufferStore):
            target = node.buffer
        else:
            return False
        return (target.same_as(buf) and len(node.indices) == len(idx)
                and all(a.same_as(b) for a, b in zip(node.indices, idx)))

    y_idx, x_idx, w_idx = vs[:-1], vs[:-2] + [vs[-1]], [vs[-2], vs[-1]]
    if not (is_access(init, y, y_idx) and isinstance(init.value, tirx.FloatImm) and init.value.value == 0):
        return None
    if not (is_access(body, y, y_idx) and isinstance(body.value, tirx.Add)):
        return None
    acc, prod = body.value.a, body.value.b
    if not (is_access(acc, y, y_idx) and isinstance(prod, tirx.Mul)):
        return None
    if not (is_access(prod.a, x, x_idx) and is_access(prod.b, w, w_idx)):
        return None
    return tuple(int(d) if isinstance(d, tirx.IntImm) else d for d in lead), n, k


def _same_dim(a, b) -> bool:
    """Two shape dims are the same: equal constants (an int or IntImm) or the same variable."""
    if isinstance(a, (int, tirx.IntImm)) and isinstance(b, (int, tirx.IntImm)):
        return int(a) == int(b)
    return a.same_as(b)


def dense_mma_pass(wgmma: bool = False):
    """Relax module pass: every fp16 NT-matmul PrimFunc (`match_nt_matmul`) but a static single row
    (`DLIGHT_GEMV_ROWS`) becomes `dense_mma_cuda` under a new name (`<old>_dense_mma`, so its kernels are
    recognisable in the library); run it after LegalizeOps and before FuseOps (our kernels are opaque to
    fusion, so no epilogue is fused into them). `wgmma`: see `dense_mma_cuda` (sm_90a builds only)."""
    @tvm.transform.module_pass(opt_level=0, name="VPTQDenseMMA")
    def rewrite(mod, _ctx):
        matched = {}
        for gv, f in mod.functions.items():
            m = match_nt_matmul(f)
            rows = _prod(m[0]) if m is not None and all(isinstance(d, int) for d in m[0]) else None
            if m is not None and rows != DLIGHT_GEMV_ROWS and dense_supported(rows, m[1], m[2], "float16"):
                matched[gv] = m
        if not matched:
            return mod
        return replace_prim_funcs(mod, {gv: (dense_mma_cuda(*m, wgmma=wgmma), f"{gv.name_hint}_dense_mma")
                                        for gv, m in matched.items()})

    return rewrite


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out
