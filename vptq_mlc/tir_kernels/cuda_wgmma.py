"""CUDA dense fp16 GEMM on Hopper's warpgroup MMA (`wgmma.mma_async`, sm_90a only), `y[..., N] = x[..., K] @ w[N, K]^T`
with fp32 accumulation: the prefill shapes, where our `mma.sync` kernel (cuda_dense_mma.py) stays well below cuBLAS
on the H100 because `mma.sync` cannot feed Hopper's tensor cores at full rate (docs/dense-mma.md).

Schedule:
- A CTA of WG consumer warpgroups (128 threads each) owns a (64 WG) x BN tile of y; warpgroup g owns rows
  64g .. 64g + 63 and all BN columns: one `wgmma.mma_async.m64nBNk16` per 16 K columns, operands straight from
  shared memory through 64-bit matrix descriptors, fp32 accumulators in registers (BN / 2 per thread).
- x and w tiles go global -> shared by 16-byte `cp.async` issued by every thread into a STAGES-deep ring; a tile is
  rows of 64 fp16 (128 bytes, one K step) in the 128-byte swizzle the descriptors name (16-byte chunk c of row r
  stored at chunk c ^ (r % 8), 8-row atoms 1024 bytes apart, atoms 1024-byte aligned).
- Per K step: wait for its cp.async group, `fence.proxy.async` (the generic-proxy writes become visible to the
  async proxy wgmma reads through), a CTA barrier, refill the slot whose wgmma group every warpgroup has retired,
  then 4 wgmma (k16 each) in one commit group and `wgmma.wait_group 1`: one group stays in flight while the next
  step's barrier and loads go on. So the ring runs STAGES - 2 steps ahead.
- Rows of x past M and rows of w past N are clamped to the last valid row (read, never stored), as in
  cuda_dense_mma.py; K must be a multiple of 64, N of 8.

The instruction needs sm_90a (arch-specific features): a library holding it must be compiled for `sm_90a`, whose
SASS runs on sm_90 devices only. So the pipeline uses it only behind a switch (`VPTQ_MLC_WGMMA=1` at compile time,
off by default) and for libraries built for sm_90 alone (compile/cuda.py then builds them as sm_90a): the symbolic-row
prefill plan of cuda_dense_mma.py (the fp16 build's linears, lm_head, and the GEMM after the VQ layers' dequantize,
cuda_dequant_gemm.py) becomes this kernel; decode and short-prompt plans keep mma.sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.errors import compile_switch
from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, grouped_tile

WGMMA_ENV = "VPTQ_MLC_WGMMA"
WGMMA_ARCH = "sm_90a"  # the code a library holding wgmma is built as (runs on sm_90 devices only)

WGMMA_BK = 64  # K columns per ring slot: one 128-byte swizzle row of fp16
WG_THREADS = 128
SW128_ATOM_BYTES = 1024  # 8 rows x 128 bytes: the swizzle pattern's period and the descriptor's stride
SM90_MAX_DYN_SMEM = 227 * 1024
# Matrix descriptor high bits (PTX ISA "Matrix Descriptor Format" for wgmma): layout type 1 = 128-byte swizzle
# (bits 62-63), stride byte offset 1024 >> 4 (bits 32-45: the distance between 8-row atoms), leading byte offset
# 1 (bits 16-29; unused by K-major swizzled layouts), base offset 0 (atoms are 1024-byte aligned).
_DESC_HI = (1 << 62) | ((SW128_ATOM_BYTES >> 4) << 32) | (1 << 16)


@dataclass(frozen=True)
class WgmmaPlan:
    warpgroups: int = 2  # consumer warpgroups along M (64 rows each)
    block_n: int = 256  # wgmma N (multiple of 8, <= 256)
    stages: int = 4  # cp.async ring depth (runs stages - 2 K steps ahead; all of it with a producer)
    # one more warpgroup that only loads (cp.async + mbarriers, "warp specialization"): the consumers never wait
    # at a CTA barrier, only on the mbarrier of the slot they read next
    producer: bool = False
    # CTA rasterization: 0 = a 2-D grid (blockIdx.x walks the column tiles); G > 0 = a 1-D grid walking groups of G
    # row tiles column by column (as cuda_dense_mma's DensePlan.group_m), so the CTAs in flight share few weight
    # tiles and a weight larger than L2 is streamed from memory about once per group instead of once per row tile
    group_m: int = 0

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        return WG_THREADS * (self.warpgroups + self.producer)

    @property
    def loader_threads(self) -> int:
        return WG_THREADS if self.producer else self.threads

    @property
    def stage_elems(self) -> int:
        return (self.block_m + self.block_n) * WGMMA_BK

    def smem_bytes(self) -> int:
        return self.stages * self.stage_elems * 2 + SW128_ATOM_BYTES  # + the alignment pad


# Measured on an H100 against cuBLAS at the Llama-2-7B prefill shapes (bench/wgmma_gemm.py, cold L2; docs/dense-mma.md):
# at 2048 rows the producer warpgroup with 256-column tiles and grouped rasterization is best (0.78-0.85x cuBLAS, vs
# 0.71-0.81x without the producer, 0.47-0.52x for the mma.sync plan); at 512 rows 128-column tiles give twice the CTAs
# (0.59-0.71x, vs 0.46-0.55x).
PREFILL_WGMMA_PLAN = WgmmaPlan(2, 256, 4, True, 8)
SHORT_PREFILL_WGMMA_PLAN = WgmmaPlan(2, 128, 6, False, 8)
SHORT_PREFILL_MAX_ROWS = 1024  # symbolic row counts up to this take SHORT_PREFILL_WGMMA_PLAN
WGMMA_FROM_ROWS = 256  # below this a pipeline's symbolic rows keep its mma.sync plans (too few 128-row tiles)


def sw128_offset(row, chunk):
    """fp16 offset of (row, 16-byte chunk) in a tile of 128-byte rows with the 128-byte swizzle."""
    return row * WGMMA_BK + (chunk ^ (row % 8)) * 8


def _wgmma_ss(acc, n: int, desc_a, desc_b):
    """`wgmma.mma_async m64n{n}k16 f32 += f16 * f16`, both operands K-major in shared memory, D += A B."""
    op = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16"]
    return op(*[acc[i] for i in range(n // 2)], desc_a, desc_b, T.ptx.pred(1), 1, 1, 0, 0)


def _desc(saddr):
    """The 64-bit matrix descriptor of a 128-byte-swizzled K-major tile starting at shared address `saddr`."""
    return T.uint64(_DESC_HI) | T.Cast("uint64", T.shift_right(saddr, T.uint32(4)) & T.uint32(0x3FFF))


def _ring_pad(ring):
    """fp16 elements from the start of the shared ring to the first 1024-byte aligned shared address, where the ring
    is used from (the hardware applies the swizzle to the address bits)."""
    return T.Cast("int32", (T.uint32(SW128_ATOM_BYTES) - T.cuda.cvta_generic_to_shared(
        T.address_of(ring[0])) % T.uint32(SW128_ATOM_BYTES)) % T.uint32(SW128_ATOM_BYTES)) // 2


def _ring_base(ring, pad):
    """The shared address the ring is used from (`pad` elements past its start)."""
    return T.cuda.cvta_generic_to_shared(T.address_of(ring[0])) + T.Cast("uint32", pad * 2)


def _gemm_macro(p: WgmmaPlan, M, N: int, K: int, rows_static: int | None, add_bias: bool = False,
                add_residual: bool = False):
    BN, S = p.block_n, p.stages
    BM, NTHR, STG = p.block_m, p.threads, p.stage_elems
    CR = WGMMA_BK // 8  # 16-byte chunks per row
    KT = K // WGMMA_BK
    LT = p.loader_threads
    A_IT, B_IT = BM * CR // LT, BN * CR // LT
    NACC = BN // 2
    GRID_N = -(-N // BN)
    GRID_M = -(-rows_static // BM) if rows_static is not None else (M + BM - 1) // BM
    DIST = S - 2  # K steps loaded ahead
    GM = p.group_m
    PAD_ELEMS = SW128_ATOM_BYTES // 2

    @T.macro
    def load_step(ring, pad, xf, w, slot, step, tid, bx, by):
        for it in T.unroll(A_IT):
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                T.address_of(ring[pad + slot * STG + sw128_offset((it * LT + tid) // CR, tid % CR)]),
                xf.access_ptr("r", offset=T.min(by * BM + (it * LT + tid) // CR, M - 1) * K
                              + step * WGMMA_BK + tid % CR * 8),
                16))
        for it in T.unroll(B_IT):
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                T.address_of(ring[pad + slot * STG + BM * WGMMA_BK
                                  + sw128_offset((it * LT + tid) // CR, tid % CR)]),
                w.access_ptr("r", offset=T.min(bx * BN + (it * LT + tid) // CR, N - 1) * K
                             + step * WGMMA_BK + tid % CR * 8),
                16))

    def biased(pair, bias, col):
        """Two fp32 sums of columns col, col + 1, plus bias[col], bias[col + 1] with `add_bias` (a TIR expression)."""
        return pair + T.Cast("float32x2", bias[T.Ramp(col, 1, 2)]) if add_bias else pair

    def rounded(pair, res, at):
        """The two fp32 sums rounded to fp16; with `add_residual`, res[at], res[at + 1] added to those in fp16 (the
        exact sum in fp32, rounded once: fp16 additions, as a separate `y + residual` pass would do them)."""
        if not add_residual:
            return T.Cast("float16x2", pair)
        return T.Cast("float16x2", T.Cast("float32x2", T.Cast("float16x2", pair))
                      + T.Cast("float32x2", res[T.Ramp(at, 1, 2)]))

    @T.macro
    def store_tile(yf, acc, tid, bx, by, bias, res):
        """Accumulators d[4j + c], c = 2h + e, of thread t: row 64 (t / 128) + 16 (t / 32 % 4) + t % 32 / 4 + 8h,
        columns 8j + 2 (t % 4) + e, e = 0, 1: one 4-byte store of both (N is even). `add_bias`: bias[column] is
        added to the fp32 sum before the one rounding to fp16; `add_residual`: res[row, column] after it."""
        for j in T.unroll(BN // 8):
            for h in T.unroll(2):
                if (by * BM + tid // WG_THREADS * 64 + tid % WG_THREADS // 32 * 16 + tid % 32 // 4 + h * 8 < M
                        and bx * BN + j * 8 + tid % 4 * 2 < N):
                    yf[T.Ramp((by * BM + tid // WG_THREADS * 64 + tid % WG_THREADS // 32 * 16 + tid % 32 // 4
                               + h * 8) * N + bx * BN + j * 8 + tid % 4 * 2, 1, 2)] = rounded(
                                   biased(acc[T.Ramp(j * 4 + h * 2, 1, 2)], bias, bx * BN + j * 8 + tid % 4 * 2),
                                   res, (by * BM + tid // WG_THREADS * 64 + tid % WG_THREADS // 32 * 16
                                         + tid % 32 // 4 + h * 8) * N + bx * BN + j * 8 + tid % 4 * 2)

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
        tid = T.launch_thread("threadIdx.x", NTHR)
        ring = T.alloc_buffer((S * STG + PAD_ELEMS,), "float16", scope="shared.dyn")
        acc = T.alloc_buffer((NACC,), "float32", scope="local")
        pad = T.alloc_buffer((1,), "int32", scope="local")
        pad[0] = _ring_pad(ring)
        base = T.alloc_buffer((1,), "uint32", scope="local")
        base[0] = _ring_base(ring, pad[0])
        for a in T.unroll(NACC):
            acc[a] = T.float32(0)
        for s in T.unroll(DIST):
            if s < KT:
                load_step(ring, pad[0], xf, w, s, s, tid, bx, by)
            T.evaluate(T.ptx["cp.async.commit_group"]())
        for kt in range(KT):
            T.evaluate(T.ptx["cp.async.wait_group"](DIST - 1))
            T.evaluate(T.ptx["fence.proxy.async.shared::cta"]())
            T.tvm_storage_sync("shared")
            # slot (kt + DIST) % S was read by step kt - 2, whose wgmma group every warpgroup retired (wait_group 1
            # at step kt - 1) before the barrier above
            if kt + DIST < KT:
                load_step(ring, pad[0], xf, w, (kt + DIST) % S, kt + DIST, tid, bx, by)
            T.evaluate(T.ptx["cp.async.commit_group"]())
            T.evaluate(T.ptx["wgmma.fence.sync.aligned"]())
            for kk in T.unroll(WGMMA_BK // 16):
                T.evaluate(_wgmma_ss(
                    acc, BN,
                    _desc(base[0] + T.Cast("uint32", ((kt % S) * STG + (tid // WG_THREADS) * 64 * WGMMA_BK) * 2
                                           + kk * 32)),
                    _desc(base[0] + T.Cast("uint32", ((kt % S) * STG + BM * WGMMA_BK) * 2 + kk * 32))))
            T.evaluate(T.ptx["wgmma.commit_group.sync.aligned"]())
            T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](1))
        T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](0))
        T.evaluate(T.ptx["cp.async.wait_group"](0))
        store_tile(yf, acc, tid, bx, by, bias, res)

    CONSUMERS = WG_THREADS * p.warpgroups

    @T.macro
    def gemm_ws(xf, w, yf, bias=None, res=None):
        if GM > 0:
            tb = T.launch_thread("blockIdx.x", GRID_M * GRID_N)
            gsz = T.min(GRID_M - tb // (GM * GRID_N) * GM, GM)
            bx = grouped_tile(tb, GRID_N, GM, gsz)[0]
            by = grouped_tile(tb, GRID_N, GM, gsz)[1]
        else:
            bx = T.launch_thread("blockIdx.x", GRID_N)
            by = T.launch_thread("blockIdx.y", GRID_M)
        tid = T.launch_thread("threadIdx.x", NTHR)
        ring = T.alloc_buffer((S * STG + PAD_ELEMS,), "float16", scope="shared.dyn")
        # full[s] (S of them): the producer's 128 threads' copies of slot s landed; empty[s] (S more): every
        # consumer thread's wgmma group reading slot s retired
        bars = T.alloc_buffer((2 * S,), "uint64", scope="shared")
        acc = T.alloc_buffer((NACC,), "float32", scope="local")
        pad = T.alloc_buffer((1,), "int32", scope="local")
        pad[0] = _ring_pad(ring)
        base = T.alloc_buffer((1,), "uint32", scope="local")
        base[0] = _ring_base(ring, pad[0])
        if tid == 0:
            for s in T.unroll(S):
                T.evaluate(T.ptx["mbarrier.init.shared::cta.b64"](T.address_of(bars[s]), T.uint32(WG_THREADS)))
                T.evaluate(T.ptx["mbarrier.init.shared::cta.b64"](T.address_of(bars[S + s]), T.uint32(CONSUMERS)))
        T.tvm_storage_sync("shared")
        if tid >= CONSUMERS:
            for kt in range(KT):
                if kt >= S:  # use kt // S - 1 of the slot released
                    T.evaluate(T.cuda.mbarrier_wait(T.address_of(bars[S + kt % S]), (kt // S + 1) % 2))
                load_step(ring, pad[0], xf, w, kt % S, kt, tid - CONSUMERS, bx, by)
                T.evaluate(T.ptx["cp.async.mbarrier.arrive.noinc.shared::cta.b64"](T.address_of(bars[kt % S])))
                T.evaluate(T.ptx["cp.async.commit_group"]())
            T.evaluate(T.ptx["cp.async.wait_group"](0))  # no thread exits with copies in flight
        else:
            for a in T.unroll(NACC):
                acc[a] = T.float32(0)
            for kt in range(KT):
                T.evaluate(T.cuda.mbarrier_wait(T.address_of(bars[kt % S]), (kt // S) % 2))
                T.evaluate(T.ptx["fence.proxy.async.shared::cta"]())
                T.evaluate(T.ptx["wgmma.fence.sync.aligned"]())
                for kk in T.unroll(WGMMA_BK // 16):
                    T.evaluate(_wgmma_ss(
                        acc, BN,
                        _desc(base[0] + T.Cast("uint32", ((kt % S) * STG + (tid // WG_THREADS) * 64 * WGMMA_BK) * 2
                                               + kk * 32)),
                        _desc(base[0] + T.Cast("uint32", ((kt % S) * STG + BM * WGMMA_BK) * 2 + kk * 32))))
                T.evaluate(T.ptx["wgmma.commit_group.sync.aligned"]())
                T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](1))
                if kt > 0:  # step kt - 1's group retired: its slot may be refilled
                    T.evaluate(T.ptx["mbarrier.arrive.shared::cta.b64"](T.address_of(bars[S + (kt - 1) % S])))
            T.evaluate(T.ptx["wgmma.wait_group.sync.aligned"](0))
            store_tile(yf, acc, tid, bx, by, bias, res)

    return gemm_ws if p.producer else gemm


def wgmma_setting() -> bool | None:
    """`VPTQ_MLC_WGMMA`: 1 builds the prefill GEMMs on wgmma (the build must be for sm_90 alone), 0 never; unset
    (None): on exactly when the build is for sm_90 alone (`compile/cuda.py`), where one H100 run measured it
    faster (bench/RESULTS.md "Session 9")."""
    if os.environ.get(WGMMA_ENV, "") == "":
        return None
    return compile_switch(WGMMA_ENV, False, "the wgmma prefill GEMM; libraries for sm_90 only")


def wgmma_for_target(target) -> bool:
    """The prefill GEMMs of a build for `target` take the wgmma kernel: the code is sm_90a and the switch is not
    0 (only CUDA targets carry that arch; the backends, compile/*.py, own every check of the target's kind)."""
    if target is None or str(target.attrs.get("arch", "")) != WGMMA_ARCH:
        return False
    return wgmma_setting() is not False


def wgmma_gemm_macro(M, n: int, k: int, rows_static: int | None, plan: WgmmaPlan = PREFILL_WGMMA_PLAN,
                     add_bias: bool = False, add_residual: bool = False):
    """The kernel launch as a macro over flat x[M*K], w[N, K], y[M*N] and, with `add_bias`, bias[N], with
    `add_residual`, res[M*N] added to the rounded output (M > 0; pasted into the caller, as
    cuda_dense_mma.gemm_macros' are)."""
    return _gemm_macro(check_plan(plan, n, k), M, n, k, rows_static, add_bias, add_residual)


def wgmma_prefill_macro(M, n: int, k: int, add_bias: bool = False, add_residual: bool = False):
    """A symbolic row count's wgmma launch: SHORT_PREFILL_WGMMA_PLAN up to SHORT_PREFILL_MAX_ROWS rows, else
    PREFILL_WGMMA_PLAN (macro over xf, w, yf, bias and res as `wgmma_gemm_macro`'s)."""
    short = wgmma_gemm_macro(M, n, k, None, SHORT_PREFILL_WGMMA_PLAN, add_bias, add_residual)
    long = wgmma_gemm_macro(M, n, k, None, PREFILL_WGMMA_PLAN, add_bias, add_residual)

    @T.macro
    def gemm(xf, w, yf, bias=None, res=None):
        if M <= SHORT_PREFILL_MAX_ROWS:
            short(xf, w, yf, bias, res)
        else:
            long(xf, w, yf, bias, res)

    return gemm


def wgmma_supported(n: int, k: int, dtype: str, plan: WgmmaPlan = PREFILL_WGMMA_PLAN) -> bool:
    return dtype == "float16" and k % WGMMA_BK == 0 and n % 8 == 0 and plan.block_n % 8 == 0


def check_plan(p: WgmmaPlan, n: int, k: int) -> WgmmaPlan:
    if k % WGMMA_BK or n % 8:
        raise ValueError(f"wgmma GEMM needs K % {WGMMA_BK} == 0 and N % 8 == 0, got N={n} K={k}")
    if p.block_n % 8 or not 8 <= p.block_n <= 256 or p.stages < 3 or p.warpgroups < 1:
        raise ValueError(f"bad wgmma plan {p}")
    if p.smem_bytes() > SM90_MAX_DYN_SMEM:
        raise ValueError(f"wgmma plan {p} needs {p.smem_bytes()} bytes of shared memory (> {SM90_MAX_DYN_SMEM})")
    return p


def dense_wgmma_cuda(lead: tuple, n: int, k: int, dtype: str = "float16",
                     plan: WgmmaPlan = PREFILL_WGMMA_PLAN) -> tirx.PrimFunc:
    """PrimFunc(x[*lead, K], w[N, K], y[*lead, N]); `lead` holds ints and/or int64 tirx.Vars (rows = their
    product). One kernel for every row count (meant for prefill rows; sm_90a only)."""
    if dtype != "float16":
        raise ValueError(f"dense_wgmma_cuda takes fp16, got {dtype}")
    check_plan(plan, n, k)
    rows_static = None
    if all(isinstance(d, int) for d in lead):
        rows_static = 1
        for d in lead:
            rows_static *= d
    M = 1
    for d in lead:
        M = M * d
    Mi = M if isinstance(M, int) else T.Cast("int32", M)
    XSHAPE, YSHAPE = tuple(lead) + (k,), tuple(lead) + (n,)
    g = _gemm_macro(plan, Mi, n, k, rows_static)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr(KERNEL_ATTRS)
        x = T.match_buffer(x_h, XSHAPE, dtype)
        w = T.match_buffer(w_h, (n, k), dtype)
        y = T.match_buffer(y_h, YSHAPE, dtype)
        xf = T.decl_buffer((M * k,), dtype, data=x.data)
        yf = T.decl_buffer((M * n,), dtype, data=y.data)
        if M <= 0:
            T.evaluate(0)
        else:
            g(xf, w, yf)

    return kernel
