"""CUDA prologue of a VPTQ linear with norm: `xs = x[:, perm] * col_scale` and `dot = x @ weight_bias` in one kernel.

Why: a normed layer's activation side was two kernels (the TE gather + the norm-bias row dot), i.e. two launches and
two reads of `x` per linear, 7 linears per decoder layer; at batch 1 those tiny kernels cost about as much GPU time
as their launch. Here CTAs of 1024 threads each gather and scale 1024 columns of a row, and the first CTA of the
row also reduces the dot (fp32, warp shuffles then one value per warp through shared memory; its loads unrolled:
with a rolled loop each step waited on the previous one). History: a rolled one-CTA-per-row version made the
11008-wide down_proj take tens of microseconds at batch 1 (7B decode 205 -> 189 tok/s); unrolled, one CTA per row
still spent ~17% of a 7B decode step in prologues (the gather is L1-sector bound on a single SM).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS, keep_params, warp_sum

THREADS = 1024  # one gathered element per thread and CTA


@T.macro
def warp_partials(acc, red, tx):
    """Each thread's partial sum in `acc[0]` summed over its warp (shuffles) into shared `red[warp]`, then a barrier:
    the CTA's sum is `sum(red)`."""
    warp_sum(acc, 1, 32, 32)
    if tx % 32 == 0:
        red[tx // 32] = acc[0]
    T.tvm_storage_sync("shared")


@T.macro
def store_row_dot(acc, red, dot, bx, tx, WARPS):
    """Each thread's partial dot in `acc[0]`, summed over the CTA (`warp_partials`) into `dot[bx, 0]` by thread 0."""
    warp_partials(acc, red, tx)
    if tx == 0:
        acc[0] = red[0]
        for w in T.unroll(1, WARPS):
            acc[0] = acc[0] + red[w]
        dot[bx, 0] = acc[0]


@T.macro
def gather_scale_dot(x, perm, col_scale, weight_bias, xs, dot, red, acc, bx, by, tx,
                     has_perm, I, CH, WARPS):  # noqa: E741
    """CTA (bx, by) of one linear's prologue: columns by*THREADS.. of row bx into `xs`; CTA (bx, 0) also reduces
    the row's dot with `weight_bias` into `dot[bx, 0]` (fp32)."""
    if by * THREADS + tx < I:
        if has_perm:
            xs[bx, by * THREADS + tx] = x[bx, perm[by * THREADS + tx]] * col_scale[by * THREADS + tx]
        else:
            xs[bx, by * THREADS + tx] = x[bx, by * THREADS + tx] * col_scale[by * THREADS + tx]
    if by == 0:
        acc[0] = T.float32(0)
        for it in T.unroll(CH):  # unrolled: every load in flight at once
            if it * THREADS + tx < I:
                acc[0] = acc[0] + T.Cast("float32", x[bx, it * THREADS + tx]) * T.Cast(
                    "float32", weight_bias[it * THREADS + tx])
        store_row_dot(acc, red, dot, bx, tx, WARPS)


@T.macro
def rmsnorm_scale_dot(x, gamma, perm, col_scale, weight_bias, xs, dot, red, acc, rstd, src, row, held, bx, by, tx,
                      has_perm, I, CH, WARPS, dtype, eps):  # noqa: E741
    """`prepare_scale_dot` of RMSNorm(x) * gamma. Every load comes first, since none depends on the row's sum: the
    row (its squares; CTA (b, 0) also keeps gamma and weight_bias for the dot) into `row[3 * CH]`, this thread's
    gathered element, its gamma and its column scale into `held[3]`; after the reduction only arithmetic and stores
    remain (the same expressions, so the same bits, as loading them after it)."""
    for it in T.unroll(CH):
        if it * THREADS + tx < I:
            row[it] = x[bx, it * THREADS + tx]
            if by == 0:
                row[CH + it] = gamma[it * THREADS + tx]
                row[2 * CH + it] = weight_bias[it * THREADS + tx]
    if by * THREADS + tx < I:
        if has_perm:
            src[0] = perm[by * THREADS + tx]
        else:
            src[0] = by * THREADS + tx
        held[0] = x[bx, src[0]]
        held[1] = gamma[src[0]]
        held[2] = col_scale[by * THREADS + tx]
    acc[0] = T.float32(0)
    for it in T.unroll(CH):
        if it * THREADS + tx < I:
            acc[0] = acc[0] + T.Cast("float32", row[it]) * T.Cast("float32", row[it])
    warp_partials(acc, red, tx)
    rstd[0] = T.float32(0)
    for w in T.unroll(WARPS):
        rstd[0] = rstd[0] + red[w]
    rstd[0] = T.rsqrt(rstd[0] / T.float32(I) + T.float32(eps))
    T.tvm_storage_sync("shared")  # every thread has read `red` before the dot reuses it
    if by * THREADS + tx < I:
        xs[bx, by * THREADS + tx] = T.Cast(dtype, T.Cast("float32", held[0]) * rstd[0] * T.Cast(
            "float32", held[1])) * held[2]
    if by == 0:
        acc[0] = T.float32(0)
        for it in T.unroll(CH):
            if it * THREADS + tx < I:
                acc[0] = acc[0] + T.Cast("float32", T.Cast(dtype, T.Cast("float32", row[it]) * rstd[0] * T.Cast(
                    "float32", row[CH + it]))) * T.Cast("float32", row[2 * CH + it])
        store_row_dot(acc, red, dot, bx, tx, WARPS)


@T.macro
def prepare_scale_dot(x, x2, gamma, perm, col_scale, weight_bias, xs, dot, red, acc, rstd, src, row, held, bx, by,
                      tx, has_perm, I, CH, WARPS, dtype, source, eps):  # noqa: E741
    """`gather_scale_dot` of the layer input a neighbour makes from the kernel's input(s) (`fused_input.FusedInput`
    `source`): "x" the rows of x, "rmsnorm" RMSNorm(x) * gamma (`rmsnorm_scale_dot`: every CTA of a row sums the
    row's squares: it needs rstd for its own columns; fp32, one rounding), "swiglu" silu(x) * x2 (silu in fp32,
    rounded, times x2), as the fused GEMV's staging computes them (`cuda_gemv.vq_gemv_cuda`): both forms feed the
    VQ product the same input. Source "x" is `gather_scale_dot` itself (the plain prologue's bits)."""
    if source == "x":
        gather_scale_dot(x, perm, col_scale, weight_bias, xs, dot, red, acc, bx, by, tx, has_perm, I, CH, WARPS)
    if source == "rmsnorm":
        rmsnorm_scale_dot(x, gamma, perm, col_scale, weight_bias, xs, dot, red, acc, rstd, src, row, held, bx, by, tx,
                          has_perm, I, CH, WARPS, dtype, eps)
    if source == "swiglu" and by * THREADS + tx < I:
        if has_perm:
            src[0] = perm[by * THREADS + tx]
        else:
            src[0] = by * THREADS + tx
        xs[bx, by * THREADS + tx] = T.Cast(dtype, T.Cast("float32", x[bx, src[0]]) * T.sigmoid(T.Cast(
            "float32", x[bx, src[0]]))) * x2[bx, src[0]] * col_scale[by * THREADS + tx]
    if source == "swiglu" and by == 0:
        acc[0] = T.float32(0)
        for it in T.unroll(CH):
            if it * THREADS + tx < I:
                acc[0] = acc[0] + T.Cast("float32", T.Cast(dtype, T.Cast("float32", x[bx, it * THREADS + tx])
                                                           * T.sigmoid(T.Cast("float32", x[bx, it * THREADS + tx])))
                                         * x2[bx, it * THREADS + tx]) * T.Cast("float32",
                                                                               weight_bias[it * THREADS + tx])
        store_row_dot(acc, red, dot, bx, tx, WARPS)


@T.macro
def prepare_launch(x, x2, gamma, perm_0, col_scale_0, weight_bias_0, perm_1, col_scale_1, weight_bias_1, perm_2,
                   col_scale_2, weight_bias_2, xs_0, dot_0, xs_1, dot_1, xs_2, dot_2, NB, count, P0, P1, P2, I, CH,
                   dtype, source, eps, counters=None, NCOUNT=0):  # noqa: E741
    """The first launch of a two-launch decode linear (`cuda_gemv.vq_gemv_cuda(..., two_launch=True)`,
    `cuda_mma_wide.vq_mma_wide_cuda(..., prologue=...)`): grid (NB rows, CH column chunks, `count` layers), CTA
    (b, c, m) runs `prepare_scale_dot` for layer m, writing its xs_m and dot_m, which the VQ launch then reads.
    With NCOUNT > 0, CTA (0, 0, 0) also zeroes `counters[NCOUNT]` (int32), the arrival counters of a VQ launch whose
    CTAs split the input (`cuda_mma_wide.WidePlan.cta_splits`): its scratch is not zeroed memory."""
    with T.launch_thread("blockIdx.x", NB) as pb:
        with T.launch_thread("blockIdx.y", CH) as pc:
            with T.launch_thread("blockIdx.z", count) as pm:
                with T.launch_thread("threadIdx.x", THREADS) as pt:
                    pred = T.alloc_buffer((THREADS // 32,), "float32", scope="shared")
                    pacc = T.alloc_buffer((1,), "float32", scope="local")
                    prstd = T.alloc_buffer((1,), "float32", scope="local")
                    psrc = T.alloc_buffer((1,), "int32", scope="local")
                    prow = T.alloc_buffer((3 * CH,), dtype, scope="local")
                    pheld = T.alloc_buffer((3,), dtype, scope="local")
                    if pm == 0:
                        prepare_scale_dot(x, x2, gamma, perm_0, col_scale_0, weight_bias_0, xs_0, dot_0, pred, pacc,
                                          prstd, psrc, prow, pheld, pb, pc, pt, P0, I, CH, THREADS // 32, dtype,
                                          source, eps)
                    # the layers' reductions reuse `pred`: a barrier between them, written out (the branch is
                    # uniform per CTA, so every thread reaches it)
                    if count >= 2:
                        T.tvm_storage_sync("shared")
                        if pm == 1:
                            prepare_scale_dot(x, x2, gamma, perm_1, col_scale_1, weight_bias_1, xs_1, dot_1, pred,
                                              pacc, prstd, psrc, prow, pheld, pb, pc, pt, P1, I, CH, THREADS // 32,
                                              dtype, source, eps)
                    if count == 3:
                        T.tvm_storage_sync("shared")
                        if pm == 2:
                            prepare_scale_dot(x, x2, gamma, perm_2, col_scale_2, weight_bias_2, xs_2, dot_2, pred,
                                              pacc, prstd, psrc, prow, pheld, pb, pc, pt, P2, I, CH, THREADS // 32,
                                              dtype, source, eps)
                    if NCOUNT > 0:
                        if pb == 0 and pc == 0 and pm == 0:
                            for it in T.unroll(-(-NCOUNT // THREADS)):
                                if it * THREADS + pt < NCOUNT:
                                    counters[it * THREADS + pt] = 0


def vq_prologue_cuda(in_features: int, dtype: str, has_perm: bool, below_rows: int = 0) -> tirx.PrimFunc:
    """PrimFunc(x[n, I], [perm[I]], col_scale[I], weight_bias[I], xs[n, I], dot[n, 1] float32) for any n;
    `below_rows` > 0: nothing runs from that many rows on (the VQ kernel after it folds the prologue there and
    never reads xs / dot: `cuda_dequant_gemm.vq_prefill_folded_cuda`).

    Grid (n, ceil(I / THREADS)): CTA (b, c) gathers and scales columns c*THREADS.. of row b; CTA (b, 0) also reduces
    the whole row's dot (contiguous loads). One CTA per row used to do everything: the permuted gather needs one
    L1 sector per element, so a 4096-wide row took ~2.5 us and an 11008-wide one ~7 us on one SM (H100 profile of
    7B decode: 17% of the step); spread over ceil(I / 1024) SMs the gather is a few hundred cycles each."""
    if below_rows:
        return _gated_prologue(in_features, dtype, (has_perm,), below_rows)
    n = tirx.Var("n", "int64")
    I = in_features  # noqa: E741
    WARPS = THREADS // 32
    CH = -(-I // THREADS)  # gather chunks = CTAs per row = dot loads per thread of CTA (b, 0)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((n, I), dtype),
        perm: T.Buffer((I,), "int32"),
        col_scale: T.Buffer((I,), dtype),
        weight_bias: T.Buffer((I,), dtype),
        xs: T.Buffer((n, I), dtype),
        dot: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        bx = T.launch_thread("blockIdx.x", n)
        by = T.launch_thread("blockIdx.y", CH)
        tx = T.launch_thread("threadIdx.x", THREADS)
        red = T.alloc_buffer((WARPS,), "float32", scope="shared")
        acc = T.alloc_buffer((1,), "float32", scope="local")
        gather_scale_dot(x, perm, col_scale, weight_bias, xs, dot, red, acc, bx, by, tx, has_perm, I, CH, WARPS)

    if has_perm:
        return kernel
    return keep_params(kernel, {p.name for p in kernel.params} - {"perm"})


MAX_SHARED = 3  # linears one shared prologue serves (q, k, v)


def vq_shared_prologue_cuda(in_features: int, dtype: str, perms: tuple[bool, ...], below_rows: int = 0
                            ) -> tirx.PrimFunc:
    """The prologues of 2..MAX_SHARED linears that read the same activation (q/k/v, gate/up) as one launch:
    PrimFunc(x[n, I], then per linear m [perm_m[I]], col_scale_m[I], weight_bias_m[I], then per linear
    xs_m[n, I], dot_m[n, 1] float32) for any n; `perms[m]`: whether linear m has a permutation.

    Grid (n, ceil(I / THREADS), len(perms)): blockIdx.z picks the linear, and each CTA does exactly what CTA
    (bx, by) of that linear's own `vq_prologue_cuda` does (same loads, same reduction order: the same bits), so a
    decoder layer saves 3 launches (q/k/v 3 -> 1, gate/up 2 -> 1) of kernels that each cost about their launch."""
    M = len(perms)
    if not 2 <= M <= MAX_SHARED:
        raise ValueError(f"a shared prologue serves 2..{MAX_SHARED} linears, got {M}")
    if below_rows:
        return _gated_prologue(in_features, dtype, perms, below_rows)
    n = tirx.Var("n", "int64")
    I = in_features  # noqa: E741
    WARPS = THREADS // 32
    CH = -(-I // THREADS)
    P0, P1, P2 = (*perms, False)[:3]

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((n, I), dtype),
        perm_0: T.Buffer((I,), "int32"),
        col_scale_0: T.Buffer((I,), dtype),
        weight_bias_0: T.Buffer((I,), dtype),
        perm_1: T.Buffer((I,), "int32"),
        col_scale_1: T.Buffer((I,), dtype),
        weight_bias_1: T.Buffer((I,), dtype),
        perm_2: T.Buffer((I,), "int32"),
        col_scale_2: T.Buffer((I,), dtype),
        weight_bias_2: T.Buffer((I,), dtype),
        xs_0: T.Buffer((n, I), dtype),
        dot_0: T.Buffer((n, 1), "float32"),
        xs_1: T.Buffer((n, I), dtype),
        dot_1: T.Buffer((n, 1), "float32"),
        xs_2: T.Buffer((n, I), dtype),
        dot_2: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        bx = T.launch_thread("blockIdx.x", n)
        by = T.launch_thread("blockIdx.y", CH)
        bz = T.launch_thread("blockIdx.z", M)
        tx = T.launch_thread("threadIdx.x", THREADS)
        red = T.alloc_buffer((WARPS,), "float32", scope="shared")
        acc = T.alloc_buffer((1,), "float32", scope="local")
        if bz == 0:
            gather_scale_dot(x, perm_0, col_scale_0, weight_bias_0, xs_0, dot_0, red, acc, bx, by, tx, P0, I, CH,
                             WARPS)
        if bz == 1:
            gather_scale_dot(x, perm_1, col_scale_1, weight_bias_1, xs_1, dot_1, red, acc, bx, by, tx, P1, I, CH,
                             WARPS)
        if M == 3:
            if bz == 2:
                gather_scale_dot(x, perm_2, col_scale_2, weight_bias_2, xs_2, dot_2, red, acc, bx, by, tx, P2, I,
                                 CH, WARPS)

    return _keep_linears(kernel, perms)


def _gated_prologue(in_features: int, dtype: str, perms: tuple[bool, ...], below_rows: int) -> tirx.PrimFunc:
    """The (shared, for 2..MAX_SHARED linears) prologue with the same signature and CTAs as `vq_prologue_cuda` /
    `vq_shared_prologue_cuda`, launched only while the row count is below `below_rows` (a host-side branch: no
    launch at all from there)."""
    M = len(perms)
    n = tirx.Var("n", "int64")
    I = in_features  # noqa: E741
    WARPS = THREADS // 32
    CH = -(-I // THREADS)
    P0, P1, P2 = (*perms, False, False)[:3]
    BELOW = below_rows

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((n, I), dtype),
        perm_0: T.Buffer((I,), "int32"),
        col_scale_0: T.Buffer((I,), dtype),
        weight_bias_0: T.Buffer((I,), dtype),
        perm_1: T.Buffer((I,), "int32"),
        col_scale_1: T.Buffer((I,), dtype),
        weight_bias_1: T.Buffer((I,), dtype),
        perm_2: T.Buffer((I,), "int32"),
        col_scale_2: T.Buffer((I,), dtype),
        weight_bias_2: T.Buffer((I,), dtype),
        xs_0: T.Buffer((n, I), dtype),
        dot_0: T.Buffer((n, 1), "float32"),
        xs_1: T.Buffer((n, I), dtype),
        dot_1: T.Buffer((n, 1), "float32"),
        xs_2: T.Buffer((n, I), dtype),
        dot_2: T.Buffer((n, 1), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        if n < BELOW:
            with T.launch_thread("blockIdx.x", n) as bx:
                with T.launch_thread("blockIdx.y", CH) as by:
                    with T.launch_thread("blockIdx.z", M) as bz:
                        with T.launch_thread("threadIdx.x", THREADS) as tx:
                            red = T.alloc_buffer((WARPS,), "float32", scope="shared")
                            acc = T.alloc_buffer((1,), "float32", scope="local")
                            if bz == 0:
                                gather_scale_dot(x, perm_0, col_scale_0, weight_bias_0, xs_0, dot_0, red, acc, bx,
                                                 by, tx, P0, I, CH, WARPS)
                            # a barrier between the linears' reductions (`red` is reused), written out: TVM's
                            # ThreadSync cannot insert one under the host-side row-count branch
                            if M >= 2:
                                T.tvm_storage_sync("shared")
                                if bz == 1:
                                    gather_scale_dot(x, perm_1, col_scale_1, weight_bias_1, xs_1, dot_1, red, acc,
                                                     bx, by, tx, P1, I, CH, WARPS)
                            if M == 3:
                                T.tvm_storage_sync("shared")
                                if bz == 2:
                                    gather_scale_dot(x, perm_2, col_scale_2, weight_bias_2, xs_2, dot_2, red, acc,
                                                     bx, by, tx, P2, I, CH, WARPS)

    return _keep_linears(kernel, perms)


def _keep_linears(kernel: tirx.PrimFunc, perms: tuple[bool, ...]) -> tirx.PrimFunc:
    """`kernel` (written for MAX_SHARED linears) with only the parameters of `len(perms)` linears, and a linear's
    perm only where `perms` says it has one."""
    M = len(perms)
    keep = {"x"} | {f"{name}_{m}" for m in range(M) for name in ("col_scale", "weight_bias", "xs", "dot")}
    keep |= {f"perm_{m}" for m in range(M) if perms[m]}
    return keep_params(kernel, keep)
