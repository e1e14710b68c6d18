"""ROCm dense fp16 GEMM on CDNA's matrix cores, `y[..., N] = x[..., K] @ w[N, K]^T` (fp32 accumulate), with
`v_mfma_f32_16x16x16f16` (LLVM `llvm.amdgcn.mfma.f32.16x16x16f16`, the instruction behind TVM 0.27's
`rocm_mfma_f16f16f32` tensor intrinsic): the fp16 model's dense linears and lm_head for symbolic rows, and the
GEMM half of "dequantize the VQ layer into an fp16 scratch weight, then a dense GEMM" (cuda_dequant_gemm.py), on
gfx908 / gfx90a / gfx94x. RDNA3 (gfx1100) has WMMA instead, for which TVM 0.27 ships no intrinsic: it keeps the
SIMT kernels. Opt-in at compile time (registry.ROCM_MFMA_ENV): no AMD GPU has run it.

Why a kernel of our own: dlight never tensorizes on rocm, and its SIMT matmul is what ROCm prefill runs otherwise.

Register layouts are TVM's (its intrinsic's index maps, restated below because importing TVM's tensor-intrinsic
package costs ~20 s; tests/test_rocm_mfma.py checks they are TVM's): for one 16x16x16 MFMA a wave's lane l
holds A[l % 16, 4 (l / 16) .. +3], B[4 (l / 16) .. +3, l % 16] (four fp16 each, contiguous in K) and
D[4 (l / 16) .. +3, l % 16] (four fp32). With w stored [N, K], both A and B fragments are 8-byte reads of
K-major shared rows: x rows for A, w rows for B.

Schedule (one plan per row-count class, untuned: no AMD GPU to measure on):
- A workgroup of 4 waves (256 threads, TVM's limit for rocm builds) owns a BM x BN tile of y; the waves form a
  WM x WN grid, each owning (16 MT) x (16 NT) outputs as MT x NT MFMA tiles with fp32 accumulators in registers.
- K steps of BK = 32: each thread loads its 16-byte chunks of the next step's x and w tiles into registers while
  the waves multiply the current step from LDS; a barrier, the registers go to LDS, a barrier. (One LDS tile, two
  barriers per step: TVM's storage-sync planner cannot tell two LDS slots apart and refuses the barrier it would
  want inside the `if` that guards the last step's store.) LDS rows are BK + 8 halves long (the pad staggers rows
  across banks; stores stay 16-byte aligned).
- Rows of x past M and rows of w past N are clamped to the last valid row (read, never stored); K must be a
  multiple of BK (the pass leaves other matmuls to dlight).

`emulate=True` builds the same per-thread code for the CPU (llvm): every per-thread register array gets one slice
per thread, each phase between barriers is a loop over the workgroup's threads, and each MFMA is computed over the
wave's 64 lanes with the intrinsic's semantics from TVM's index maps, so tests/test_rocm_mfma.py runs the kernel's
exact index arithmetic against numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.tir_kernels.cuda_common import replace_prim_funcs, vr
from vptq_mlc.tir_kernels.cuda_dense_mma import dense_dispatch, dense_rows, match_nt_matmul

WAVE = 64
MFMA_INTRIN = "llvm.amdgcn.mfma.f32.16x16x16f16"
# CDNA archs with v_mfma_f32_16x16x16f16 (MI100, MI200, MI300, MI350); gfx90a and gfx942 are built in tests
MFMA_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")
LDS_BYTES = 65536
ROW_PAD = 8  # halves after each LDS row
DECODE_MAX_ROWS = 16  # symbolic row counts up to this take DECODE_PLAN
# Below this many 128 x 128 workgroups a symbolic row count runs SMALL_PLAN's 64 x 64 tiles (more workgroups for
# the 104-304 CUs of MI210-MI300X). Untuned.
FULL_GRID_WORKGROUPS = 128



# The intrinsic's lane layouts as TVM's MFMA tensor intrinsic defines them (tvm/s_tir/tensor_intrin/rocm.py:
# thread_id_shared_access_64x4_to_16x16_layout_A/B/C and shared_16x16_to_local_64x4_layout_A/B/C; AMD's matrix
# instruction calculator lists the same for CDNA2/CDNA3, docs/rocm.md): (lane, element) -> (row, col) of the 16x16
# A, B, D tiles, and back. Plain arithmetic: ints, numpy arrays and TIR expressions.
def A_OF_LANE(lane, e):  # noqa: N802 - (lane, e) -> (m, k)
    return lane % 16, lane // 16 * 4 + e


def B_OF_LANE(lane, e):  # noqa: N802 - (lane, e) -> (k, n)
    return e + lane // 16 * 4, lane % 16


def D_OF_LANE(lane, e):  # noqa: N802 - (lane, e) -> (m, n)
    return e + lane // 16 * 4, lane % 16


def LANE_OF_A(m, k):  # noqa: N802 - (m, k) -> (lane, e)
    return m + 16 * (k // 4), k % 4


def LANE_OF_B(k, n):  # noqa: N802 - (k, n) -> (lane, e)
    return n + k // 4 * 16, k % 4


def LANE_OF_D(m, n):  # noqa: N802 - (m, n) -> (lane, e)
    return n + m // 4 * 16, m % 4



@dataclass(frozen=True)
class MfmaPlan:
    waves_m: int  # WM
    waves_n: int  # WN
    m_tiles: int  # MT: 16-row MFMA tiles per wave
    n_tiles: int  # NT: 16-column MFMA tiles per wave
    block_k: int = 32  # K per step (multiple of 16)

    @property
    def block_m(self) -> int:
        return self.waves_m * self.m_tiles * 16

    @property
    def block_n(self) -> int:
        return self.waves_n * self.n_tiles * 16

    @property
    def threads(self) -> int:
        return WAVE * self.waves_m * self.waves_n

    @property
    def row_stride(self) -> int:  # halves per LDS row
        return self.block_k + ROW_PAD

    def lds_bytes(self) -> int:
        return (self.block_m + self.block_n) * self.row_stride * 2


DECODE_PLAN = MfmaPlan(waves_m=1, waves_n=4, m_tiles=1, n_tiles=2)  # 16 x 128: the weight is streamed once
SMALL_PLAN = MfmaPlan(waves_m=2, waves_n=2, m_tiles=2, n_tiles=2)  # 64 x 64
PREFILL_PLAN = MfmaPlan(waves_m=2, waves_n=2, m_tiles=4, n_tiles=4)  # 128 x 128


def mfma_arch(arch: str) -> bool:
    """Whether `arch` (a gfx name) has the MFMA instruction this kernel uses."""
    return arch in MFMA_ARCHS


def mfma_supported(n: int, k: int, dtype: str) -> bool:
    return dtype == "float16" and n >= 1 and k % PREFILL_PLAN.block_k == 0


def symbolic_plans(n: int) -> list[tuple[int | None, MfmaPlan]]:
    """The run-time plan choice for a symbolic row count: (row limit or None, plan), first match wins."""
    plans: list[tuple[int | None, MfmaPlan]] = [(DECODE_MAX_ROWS, DECODE_PLAN)]
    tiles_n = -(-n // PREFILL_PLAN.block_n)
    if tiles_n < FULL_GRID_WORKGROUPS:
        small = PREFILL_PLAN.block_m * ((FULL_GRID_WORKGROUPS - 1) // tiles_n)
        if small > DECODE_MAX_ROWS:
            plans.append((small, SMALL_PLAN))
    plans.append((None, PREFILL_PLAN))
    return plans


@dataclass(frozen=True)
class MfmaLayout:
    """Where plan `p` keeps things, as arithmetic on ints, numpy arrays and TIR expressions alike. Offsets are in
    fp16 elements of the LDS buffer: BM x-rows then BN w-rows of `row_stride` halves."""

    p: MfmaPlan

    def x_slot(self, row, col):
        return row * self.p.row_stride + col

    def w_slot(self, row, col):
        return (self.p.block_m + row) * self.p.row_stride + col

    def a_frag(self, wm, i, kk, lane):
        """LDS offset of lane `lane`'s 4 A elements (e = 0..3 consecutive in K) of m-tile `i`, k16 step `kk`."""
        m, k = A_OF_LANE(lane, 0)
        return self.x_slot(wm * self.p.m_tiles * 16 + i * 16 + m, kk * 16 + k)

    def b_frag(self, wn, j, kk, lane):
        """LDS offset of lane `lane`'s 4 B elements of n-tile `j` (B[k, n] = w[n, k]: consecutive in K)."""
        k, n = B_OF_LANE(lane, 0)
        return self.w_slot(wn * self.p.n_tiles * 16 + j * 16 + n, kk * 16 + k)

    def out_row(self, wm, i, lane, e):
        """Workgroup-local output row of accumulator element `e` of m-tile `i`."""
        return wm * self.p.m_tiles * 16 + i * 16 + D_OF_LANE(lane, e)[0]

    def out_col(self, wn, j, lane, e):
        return wn * self.p.n_tiles * 16 + j * 16 + D_OF_LANE(lane, e)[1]


def _gemm_macro(p: MfmaPlan, M, N: int, K: int, dtype: str, rows_static: int | None, emulate: bool):
    """The kernel launch of plan `p` as a macro over flat x[M*K], w[N, K], y[M*N] (`emulate`: module doc)."""
    if K % p.block_k or p.block_k % 16 or p.lds_bytes() > LDS_BYTES or p.threads > 256:
        raise ValueError(f"no MFMA plan for K={K} (plan {p}, {p.lds_bytes()} bytes of LDS)")
    lay = MfmaLayout(p)
    WN, MT, NT, BM, BN, BK, NTHR = p.waves_n, p.m_tiles, p.n_tiles, p.block_m, p.block_n, p.block_k, p.threads
    NWAVES = NTHR // WAVE
    CR = BK // 8  # 16-byte chunks per tile row
    KT = K // BK
    A_CH, B_CH = BM * CR, BN * CR
    A_IT, B_IT = -(-A_CH // NTHR), -(-B_CH // NTHR)
    NACC, NFA, NFB, STG = MT * NT * 4, MT * 4, NT * 4, (A_IT + B_IT) * 8
    LDS = (BM + BN) * p.row_stride
    GRID_N = -(-N // BN)
    GRID_M = -(-rows_static // BM) if rows_static is not None else (M + BM - 1) // BM

    def reg(t, size: int, idx):
        """Element `idx` of thread t's register array of `size`: its own array on the GPU, slice t emulated."""
        return t * size + idx if emulate else idx

    @T.macro
    def global_load(stg, xf, w, step, t, bx, by):
        """Thread t's 16-byte chunks of K step `step` of the x and w tiles, into its staging registers."""
        for it in T.unroll(A_IT):
            if A_CH % NTHR == 0 or it * NTHR + t < A_CH:
                stg[vr(reg(t, STG, it * 8), 8)] = xf[vr(T.min(by * BM + (it * NTHR + t) // CR, M - 1) * K
                                                        + step * BK + (it * NTHR + t) % CR * 8, 8)]
        for it in T.unroll(B_IT):
            if B_CH % NTHR == 0 or it * NTHR + t < B_CH:
                stg[vr(reg(t, STG, (A_IT + it) * 8), 8)] = w[T.min(bx * BN + (it * NTHR + t) // CR, N - 1),
                                                             vr(step * BK + (it * NTHR + t) % CR * 8, 8)]

    @T.macro
    def lds_store(lds, stg, t):
        for it in T.unroll(A_IT):
            if A_CH % NTHR == 0 or it * NTHR + t < A_CH:
                lds[vr(lay.x_slot((it * NTHR + t) // CR, (it * NTHR + t) % CR * 8), 8)] = \
                    stg[vr(reg(t, STG, it * 8), 8)]
        for it in T.unroll(B_IT):
            if B_CH % NTHR == 0 or it * NTHR + t < B_CH:
                lds[vr(lay.w_slot((it * NTHR + t) // CR, (it * NTHR + t) % CR * 8), 8)] = \
                    stg[vr(reg(t, STG, (A_IT + it) * 8), 8)]

    @T.macro
    def frag_load(fa, fb, lds, kk, t):
        """Thread t's A fragments (its wave's m-tiles) and B fragments (n-tiles) of k16 step `kk`: 8 bytes each."""
        for i in T.unroll(MT):
            fa[vr(reg(t, NFA, i * 4), 4)] = lds[vr(lay.a_frag(t // WAVE // WN, i, kk, t % WAVE), 4)]
        for j in T.unroll(NT):
            fb[vr(reg(t, NFB, j * 4), 4)] = lds[vr(lay.b_frag(t // WAVE % WN, j, kk, t % WAVE), 4)]

    @T.macro
    def mfma(fa, fb, acc):
        for i in T.unroll(MT):
            for j in T.unroll(NT):
                acc[vr((i * NT + j) * 4, 4)] = T.call_llvm_pure_intrin(
                    "float32x4", MFMA_INTRIN, fa[vr(i * 4, 4)], fb[vr(j * 4, 4)], acc[vr((i * NT + j) * 4, 4)],
                    T.int32(0), T.int32(0), T.int32(0))

    @T.macro
    def mfma_emulated(fa, fb, acc, wave):
        """The same MFMAs for the 64 lanes of `wave`, as TVM's intrinsic description defines the instruction."""
        for i in range(MT):
            for j in range(NT):
                for mi, nj, kq in T.grid(16, 16, 16):
                    acc[(wave * WAVE + LANE_OF_D(mi, nj)[0]) * NACC + (i * NT + j) * 4 + LANE_OF_D(mi, nj)[1]] = (
                        acc[(wave * WAVE + LANE_OF_D(mi, nj)[0]) * NACC + (i * NT + j) * 4 + LANE_OF_D(mi, nj)[1]]
                        + T.Cast("float32", fa[(wave * WAVE + LANE_OF_A(mi, kq)[0]) * NFA + i * 4
                                               + LANE_OF_A(mi, kq)[1]])
                        * T.Cast("float32", fb[(wave * WAVE + LANE_OF_B(kq, nj)[0]) * NFB + j * 4
                                               + LANE_OF_B(kq, nj)[1]]))

    @T.macro
    def store(yf, acc, t, bx, by):
        for i in T.unroll(MT):
            for j in T.unroll(NT):
                for e in T.unroll(4):
                    if (by * BM + lay.out_row(t // WAVE // WN, i, t % WAVE, e) < M
                            and bx * BN + lay.out_col(t // WAVE % WN, j, t % WAVE, e) < N):
                        yf[(by * BM + lay.out_row(t // WAVE // WN, i, t % WAVE, e)) * N
                           + bx * BN + lay.out_col(t // WAVE % WN, j, t % WAVE, e)] = T.Cast(
                            dtype, acc[reg(t, NACC, (i * NT + j) * 4 + e)])

    @T.macro
    def gemm(xf, w, yf):
        bx = T.launch_thread("blockIdx.x", GRID_N)
        by = T.launch_thread("blockIdx.y", GRID_M)
        tx = T.launch_thread("threadIdx.x", NTHR)
        lds = T.alloc_buffer((LDS,), dtype, scope="shared")
        acc = T.alloc_buffer((NACC,), "float32", scope="local")
        fa = T.alloc_buffer((NFA,), dtype, scope="local")
        fb = T.alloc_buffer((NFB,), dtype, scope="local")
        stg = T.alloc_buffer((STG,), dtype, scope="local")
        for a in T.unroll(NACC):
            acc[a] = T.float32(0)
        global_load(stg, xf, w, 0, tx, bx, by)
        lds_store(lds, stg, tx)
        T.tvm_storage_sync("shared")
        for kt in range(KT):
            # the next step's tiles travel to registers while the matrix cores work on this one
            if kt + 1 < KT:
                global_load(stg, xf, w, kt + 1, tx, bx, by)
            for kk in T.unroll(BK // 16):
                frag_load(fa, fb, lds, kk, tx)
                mfma(fa, fb, acc)
            T.tvm_storage_sync("shared")
            if kt + 1 < KT:
                lds_store(lds, stg, tx)
            T.tvm_storage_sync("shared")
        store(yf, acc, tx, bx, by)

    @T.macro
    def gemm_emulated(xf, w, yf):
        for by in range(GRID_M):
            for bx in range(GRID_N):
                lds = T.alloc_buffer((LDS,), dtype)
                acc = T.alloc_buffer((NTHR * NACC,), "float32")
                fa = T.alloc_buffer((NTHR * NFA,), dtype)
                fb = T.alloc_buffer((NTHR * NFB,), dtype)
                stg = T.alloc_buffer((NTHR * STG,), dtype)
                for q in range(LDS):  # NaN: a read of anything the loads did not write shows in the output
                    lds[q] = T.Cast(dtype, T.float32("nan"))
                for q in range(NTHR * NACC):
                    acc[q] = T.float32(0)
                for t in range(NTHR):
                    global_load(stg, xf, w, 0, t, bx, by)
                for t in range(NTHR):
                    lds_store(lds, stg, t)
                for kt in range(KT):
                    if kt + 1 < KT:
                        for t in range(NTHR):
                            global_load(stg, xf, w, kt + 1, t, bx, by)
                    for kk in range(BK // 16):
                        for t in range(NTHR):
                            frag_load(fa, fb, lds, kk, t)
                        for wave in range(NWAVES):
                            mfma_emulated(fa, fb, acc, wave)
                    if kt + 1 < KT:
                        for t in range(NTHR):
                            lds_store(lds, stg, t)
                for t in range(NTHR):
                    store(yf, acc, t, bx, by)

    return gemm_emulated if emulate else gemm


def mfma_macros(plans, M, n: int, k: int, dtype: str, rows_static: int | None,
                emulate: bool = False) -> list[tuple[int, object]]:
    """(row limit, 0 for none; kernel-launch macro over flat x[M*K], w[N, K], y[M*N]) per plan of `plans`, as
    `cuda_dense_mma.dense_dispatch` and `cuda_dequant_gemm.vq_prefill_cuda` take them."""
    macros = []
    for limit, pl in plans:  # under a row limit that fits one tile the grid is one tile high
        grid_rows = limit if limit is not None and limit <= pl.block_m else rows_static
        macros.append((limit or 0, _gemm_macro(pl, M, n, k, dtype, grid_rows, emulate)))
    return macros


def dense_mfma_rocm(lead: tuple, n: int, k: int, dtype: str = "float16", plan: MfmaPlan | None = None,
                    emulate: bool = False) -> tirx.PrimFunc:
    """PrimFunc(x[*lead, K], w[N, K], y[*lead, N]); `lead` holds ints and/or int64 tirx.Vars. Symbolic rows get
    every plan of `symbolic_plans` and pick at run time; static rows (tests) and `plan` one plan."""
    if not mfma_supported(n, k, dtype):
        raise ValueError(f"dense_mfma_rocm takes fp16 with K a multiple of {PREFILL_PLAN.block_k}; got {dtype}, "
                         f"K={k}")
    rows_static, Mi = dense_rows(lead)
    if plan is not None:
        plans = [(None, plan)]
    elif rows_static is not None:
        plans = [(None, DECODE_PLAN if rows_static <= DECODE_MAX_ROWS else PREFILL_PLAN)]
    else:
        plans = symbolic_plans(n)
    return dense_dispatch(lead, n, k, dtype, mfma_macros(plans, Mi, n, k, dtype, rows_static, emulate))


def vq_gemm_macros(rows, n: int, k: int, dtype: str) -> list[tuple[int, object]]:
    """The symbolic-row GEMM macros for a VQ layer's dequantize + GEMM prefill (`vq_prefill_cuda(gemms=...)`)."""
    return mfma_macros(symbolic_plans(n), rows, n, k, dtype, None)


def dense_mfma_pass():
    """Relax module pass: every fp16 NT matmul with a symbolic row count (`match_nt_matmul`; prefill, batch
    decode, lm_head over them) becomes `dense_mfma_rocm` under a new name (`<old>_dense_mfma`); static rows keep
    dlight's GEMV. Run after LegalizeOps and before FuseOps, as `cuda_dense_mma.dense_mma_pass`."""
    @tvm.transform.module_pass(opt_level=0, name="VPTQDenseMFMA")
    def rewrite(mod, _ctx):
        matched = {}
        for gv, f in mod.functions.items():
            m = match_nt_matmul(f)
            if m is not None and not all(isinstance(d, int) for d in m[0]) and mfma_supported(m[1], m[2],
                                                                                                "float16"):
                matched[gv] = m
        if not matched:
            return mod
        return replace_prim_funcs(mod, {gv: (dense_mfma_rocm(*m), f"{gv.name_hint}_dense_mfma")
                                        for gv, m in matched.items()})

    return rewrite
