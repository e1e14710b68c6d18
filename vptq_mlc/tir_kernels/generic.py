"""Target-independent codebook-lookup matmul, written as a TE compute (llvm runs it unscheduled).

Computes `y[n, r] = sum_k xs[n, k] * Wpre[r, k]` where `Wpre` is the layer's pre-permutation dense weight
given implicitly by codes and codebooks (layout `generic`, docs/ARCHITECTURE.md). Permutation, norm and
biases are applied outside (see model/vptq_linear.py), so this is the only function that looks codes up.
"""

from __future__ import annotations

from typing import NamedTuple

import tvm
from tvm import te, tirx

from vptq_mlc.artifact.vq_layout import vq_operand_shapes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig


class KernelDims(NamedTuple):
    """The layer sizes a hand-written kernel closes over (TVMScript reads them as Python constants). Absent
    operands get size 1, so one kernel body serves every variant (the unused buffers are dropped afterwards)."""

    I: int  # noqa: E741 - in_features
    O: int  # noqa: E741 - out_features
    v: int  # vector length
    G: int  # groups
    S: int  # group size (columns per group)
    K: int  # main codebook entries
    KR: int  # residual codebook entries (0: none)
    KR1: int  # max(KR, 1)
    NV: int  # vector rows
    L: int  # G * S main columns
    OSZ: int  # outlier columns (0: none)
    OSZ1: int  # max(OSZ, 1)
    HAS_RES: bool
    HAS_OUT: bool
    VO: int  # outlier vector length (1 without outliers)
    KO: int  # outlier codebook entries (1 without)
    NO: int  # outlier vector rows (1 without)


def kernel_dims(cfg: VPTQLayerConfig) -> KernelDims:
    out = cfg.has_outliers
    return KernelDims(
        I=cfg.in_features, O=cfg.out_features, v=cfg.vector_len, G=cfg.group_num, S=cfg.group_size,
        K=cfg.num_centroids, KR=cfg.num_res_centroids, KR1=max(cfg.num_res_centroids, 1), NV=cfg.num_vectors,
        L=cfg.group_num * cfg.group_size, OSZ=cfg.outlier_size, OSZ1=max(cfg.outlier_size, 1),
        HAS_RES=cfg.has_residual, HAS_OUT=out, VO=cfg.outlier_vector_len if out else 1,
        KO=cfg.num_outlier_centroids if out else 1, NO=cfg.num_outlier_vectors if out else 1,
    )


def vq_matmul_generic(cfg: VPTQLayerConfig, dtype: str, n: int | tirx.Var | None = None,
                      codebook_dtype: str | None = None) -> tirx.PrimFunc:
    """PrimFunc(xs[n, I], <operands of vq_operand_shapes>, y[n, O]); accumulates in float32. `codebook_dtype`:
    the codebooks' stored dtype when narrower than the model's (ChatConfig.codebook_dtype; None: `dtype`).

    Sums are computed per (row, vector row i, lane j) as `acc[n, N, v]` so a schedule can load each code once
    and reuse it for the v lanes of its codebook entry (and for every activation row)."""
    n = tirx.Var("n", "int64") if n is None else n
    v, s, osz = cfg.vector_len, cfg.group_size, cfg.outlier_size
    ops = {
        name: te.placeholder(shape, (codebook_dtype or dtype if name.endswith("centroids") else dtype)
                             if dt == "float" else dt, name=name)
        for name, (shape, dt) in vq_operand_shapes(cfg).items()
    }
    xs = te.placeholder((n, cfg.in_features), dtype, name="xs")
    k = te.reduce_axis((0, cfg.group_num * s), name="k")

    def main(b, i, j):
        g = k // s
        w = ops["centroids"][g, ops["codes"][i, k].astype("int32"), j].astype("float32")
        if cfg.has_residual:
            w = w + ops["res_centroids"][g, ops["res_codes"][i, k].astype("int32"), j].astype("float32")
        return te.sum(xs[b, osz + k].astype("float32") * w, axis=k)

    acc = te.compute((n, cfg.num_vectors, v), main, name="acc_main")
    if cfg.has_outliers:
        ko = te.reduce_axis((0, osz), name="ko")
        vo = cfg.outlier_vector_len

        def outl(b, i, j):
            w = ops["outlier_centroids"][ops["outlier_codes"][i, ko].astype("int32"), j]
            return te.sum(xs[b, ko].astype("float32") * w.astype("float32"), axis=ko)

        acc_o = te.compute((n, cfg.num_outlier_vectors, vo), outl, name="acc_outlier")
        y = te.compute(
            (n, cfg.out_features),
            lambda b, r: (acc[b, r // v, r % v] + acc_o[b, r // vo, r % vo]).astype(dtype),
            name="y",
        )
    else:
        y = te.compute((n, cfg.out_features), lambda b, r: acc[b, r // v, r % v].astype(dtype), name="y")
    func = te.create_prim_func([xs, *ops.values(), y])
    return func.without_attr("global_symbol").with_attr("tirx.noalias", True)


def schedule_cpu(func: tirx.PrimFunc, rows: int | None = None) -> tirx.PrimFunc:
    """CPU schedule: parallel over vector rows; per vector row the sum over codes runs in `unroll` independent
    register accumulators of v lanes (rfactor over the code axis), each code loaded once and its codebook entry
    used for every activation row. Why: accumulating into one memory location chains every code's FMA through a
    store and a reload (5x slower at SmolLM2's shapes). One activation row (decode) takes 4 accumulators; more
    rows take 2, since each holds a row's worth of lanes."""
    unroll = 4 if rows == 1 else 2
    sch = tvm.s_tir.Schedule(func)
    for name in ("acc_main", "acc_outlier"):
        try:
            blk = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - no outlier block in this layer
            continue
        b, i, j, k = sch.get_loops(blk)
        extent = int(sch.get(k).extent)
        u = unroll if extent % unroll == 0 else 1
        _, k_in = sch.split(k, [None, u])
        rf = sch.rfactor(k_in, 0)
        sch.set_scope(rf, 0, "local")  # each thread its own accumulators (allocated inside the parallel loop)
        b, i, j, k_in = sch.get_loops(blk)
        sch.reorder(i, b, j, k_in)
        sch.parallel(i)
        sch.compute_at(rf, i)
        _, acc_u, *acc_b, acc_j, acc_k = sch.get_loops(rf)  # no row loop at one static row
        sch.reorder(acc_k, acc_u, *acc_b, acc_j)
        sch.vectorize(acc_j)
        sch.unroll(acc_u)
        sch.decompose_reduction(rf, acc_k)
        sch.vectorize(sch.get_loops(blk)[-2])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def vq_gathered_generic(cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int,
                        n: int | tirx.Var | None = None, codebook_dtype: str | None = None) -> tirx.PrimFunc:
    """PrimFunc(xs[n, slots, I], mat[n, slots] int32, <stacked operands>, y[n, slots, O]): `y[b, s] = W[m] @
    xs[b, s]` with `m = mat[b, s]`, W[m] matrix m of `matrices` stacked layers of config `cfg`
    (artifact/expert_stack.py: matrix m's group g is codebook row m*G + g, its vector row i is code row m*N + i).
    The same sums as `vq_matmul_generic`, per (row, slot) and in float32."""
    from vptq_mlc.artifact.expert_stack import stacked_operand_shapes

    n = tirx.Var("n", "int64") if n is None else n
    v, s, osz, G, NV = cfg.vector_len, cfg.group_size, cfg.outlier_size, cfg.group_num, cfg.num_vectors
    ops = {
        name: te.placeholder(shape, (codebook_dtype or dtype if name.endswith("centroids") else dtype)
                             if dt == "float" else dt, name=name)
        for name, (shape, dt) in stacked_operand_shapes(cfg, matrices).items()
    }
    xs = te.placeholder((n, slots, cfg.in_features), dtype, name="xs")
    mat = te.placeholder((n, slots), "int32", name="mat")
    k = te.reduce_axis((0, G * s), name="k")

    def main(b, sl, i, j):
        m = mat[b, sl]
        g = m * G + k // s
        row = m * NV + i
        w = ops["centroids"][g, ops["codes"][row, k].astype("int32"), j].astype("float32")
        if cfg.has_residual:
            w = w + ops["res_centroids"][g, ops["res_codes"][row, k].astype("int32"), j].astype("float32")
        return te.sum(xs[b, sl, osz + k].astype("float32") * w, axis=k)

    acc = te.compute((n, slots, NV, v), main, name="acc_main")
    if cfg.has_outliers:
        ko = te.reduce_axis((0, osz), name="ko")
        vo, no, kc = cfg.outlier_vector_len, cfg.num_outlier_vectors, cfg.num_outlier_centroids

        def outl(b, sl, i, j):
            m = mat[b, sl]
            w = ops["outlier_centroids"][m * kc + ops["outlier_codes"][m * no + i, ko].astype("int32"), j]
            return te.sum(xs[b, sl, ko].astype("float32") * w.astype("float32"), axis=ko)

        acc_o = te.compute((n, slots, no, vo), outl, name="acc_outlier")
        y = te.compute((n, slots, cfg.out_features),
                       lambda b, sl, r: (acc[b, sl, r // v, r % v] + acc_o[b, sl, r // vo, r % vo]).astype(dtype),
                       name="y")
    else:
        y = te.compute((n, slots, cfg.out_features), lambda b, sl, r: acc[b, sl, r // v, r % v].astype(dtype),
                       name="y")
    func = te.create_prim_func([xs, mat, *ops.values(), y])
    return func.without_attr("global_symbol").with_attr("tirx.noalias", True)


def schedule_gathered_cpu(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """CPU schedule of `vq_gathered_generic`: (row, slot, vector row) in parallel, the v lanes vectorized."""
    sch = tvm.s_tir.Schedule(func)
    for name in ("acc_main", "acc_outlier"):
        try:
            blk = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - no outlier block in this layer
            continue
        b, sl, i, j, k = sch.get_loops(blk)
        sch.parallel(sch.fuse(b, sl, i))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def gathered_row_dot(in_features: int, dtype: str, slots: int, shared: bool, matrices: int) -> tirx.PrimFunc:
    """PrimFunc(x[n, X, I], mat[n, slots] int32, w[matrices, I], s[n, slots] float32): `s[b, t] = x[b, t or 0] .
    w[mat[b, t]]` in float32 (X = 1 when `shared`, else slots): the norm-bias term of gathered linears."""
    n = tirx.Var("n", "int64")
    x = te.placeholder((n, 1 if shared else slots, in_features), dtype, name="x")
    mat = te.placeholder((n, slots), "int32", name="mat")
    w = te.placeholder((matrices, in_features), dtype, name="w")
    k = te.reduce_axis((0, in_features), name="k")
    s = te.compute((n, slots), lambda b, t: te.sum(
        x[b, 0 if shared else t, k].astype("float32") * w[mat[b, t], k].astype("float32"), axis=k), name="row_dot")
    return te.create_prim_func([x, mat, w, s]).without_attr("global_symbol").with_attr("tirx.noalias", True)
