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


def vq_prologue_cuda(in_features: int, dtype: str, has_perm: bool) -> tirx.PrimFunc:
    """PrimFunc(x[n, I], [perm[I]], col_scale[I], weight_bias[I], xs[n, I], dot[n, 1] float32) for any n.

    Grid (n, ceil(I / THREADS)): CTA (b, c) gathers and scales columns c*THREADS.. of row b; CTA (b, 0) also reduces
    the whole row's dot (contiguous loads). One CTA per row used to do everything: the permuted gather needs one
    L1 sector per element, so a 4096-wide row took ~2.5 us and an 11008-wide one ~7 us on one SM (H100 profile of
    7B decode: 17% of the step); spread over ceil(I / 1024) SMs the gather is a few hundred cycles each."""
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
            warp_sum(acc, 1, 32, 32)
            if tx % 32 == 0:
                red[tx // 32] = acc[0]
            T.tvm_storage_sync("shared")
            if tx == 0:
                acc[0] = red[0]
                for w in T.unroll(1, WARPS):
                    acc[0] = acc[0] + red[w]
                dot[bx, 0] = acc[0]

    if has_perm:
        return kernel
    return keep_params(kernel, {p.name for p in kernel.params} - {"perm"})
