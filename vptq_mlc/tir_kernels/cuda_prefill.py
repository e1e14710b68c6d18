"""CUDA prefill / many-row kernel: dequantize weight tiles on the fly inside a dlight-scheduled matmul.

The weight is described as a TE stage `W[r, k]` (codebook lookups, outlier columns first) feeding one
reduction `y[b, r] = sum_k xs[b, k] * W[r, k]`. dlight's Matmul rule inlines that stage into its shared-memory
tile loads, so each tile is dequantized in shared memory and multiplied (SIMT: see dequant_matmul_cuda); this
kernel never writes a dense weight to device memory (the fp16 prefill path of cuda_dequant_gemm.py does, into a
scratch output, for long prompts). Used for fp32 models' symbolic rows on CUDA and for ROCm's. Correctness first:
this is a generic schedule, not tuned for VQ (see bench/RESULTS.md).
"""

from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.target import Target

from vptq_mlc.artifact.vq_layout import vq_operand_shapes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig


def dequant_matmul_compute(cfg: VPTQLayerConfig, dtype: str, n: int | tirx.Var | None = None) -> tirx.PrimFunc:
    """Unscheduled PrimFunc(xs[n, I], *operands, y[n, O]) with an explicit dequantized-weight stage."""
    n = tirx.Var("n", "int64") if n is None else n
    v, s, osz = cfg.vector_len, cfg.group_size, cfg.outlier_size
    i64 = lambda *d: tuple(tirx.IntImm("int64", x) if isinstance(x, int) else x for x in d)  # noqa: E731
    ops = {
        name: te.placeholder(i64(*shape), dtype if dt == "float" else dt, name=name)
        for name, (shape, dt) in vq_operand_shapes(cfg).items()
    }
    xs = te.placeholder(i64(n, cfg.in_features), dtype, name="xs")

    def weight(r, k):
        kk = tirx.max(k - osz, 0)
        i, j, g = r // v, r % v, kk // s
        w = ops["centroids"][g, ops["codes"][i, kk].astype("int32"), j].astype("float32")
        if cfg.has_residual:
            w = w + ops["res_centroids"][g, ops["res_codes"][i, kk].astype("int32"), j].astype("float32")
        if cfg.has_outliers:
            vo = cfg.outlier_vector_len
            ko = tirx.min(k, osz - 1)
            wo = ops["outlier_centroids"][ops["outlier_codes"][r // vo, ko].astype("int32"), r % vo].astype("float32")
            w = tirx.Select(k < osz, wo, w)
        return w.astype(dtype)

    w = te.compute(i64(cfg.out_features, cfg.in_features), weight, name="w_dequant")
    k = te.reduce_axis(i64(0, cfg.in_features), name="k")
    acc = te.compute(
        i64(n, cfg.out_features),
        lambda b, r: te.sum(xs[b, k].astype("float32") * w[r, k].astype("float32"), axis=k),
        name="acc",
    )
    y = te.compute(i64(n, cfg.out_features), lambda b, r: acc[b, r].astype(dtype), name="y")
    return te.create_prim_func([xs, *ops.values(), y]).without_attr("global_symbol").with_attr("tirx.noalias", True)


def dequant_matmul_cuda(cfg: VPTQLayerConfig, dtype: str, target: Target) -> tirx.PrimFunc:
    """The compute above, scheduled by dlight (Matmul, tensor cores for fp16) for `target`."""
    from tvm.s_tir import dlight as dl

    # dlight's wmma tensorization segfaults in TVM 0.27 (s_tir Tensorize) on this dequant prologue, so the
    # SIMT tiled schedule is used; a hand-written MMA prefill kernel is future work.
    func = dequant_matmul_compute(cfg, dtype).with_attr("dlight.do_not_tensorize", True)
    with target:
        sch = dl.gpu.Matmul().apply(func, target, False)
    if sch is None:
        raise RuntimeError(f"dlight Matmul could not schedule the dequant matmul of {cfg.variant.name}")
    if cfg.has_outliers:
        # TVM 0.27's CUDA codegen emits invalid code for a vectorized Select (the outlier/main switch):
        # load those tiles element-wise instead.
        # (dlight names the tile load `..._pad_shared` when it pads a dimension to the tile size)
        for name in ("w_dequant_reindex_shared", "w_dequant_reindex_pad_shared"):
            try:
                blk = sch.get_sblock(name)
            except tvm.s_tir.schedule.ScheduleError:
                continue
            for loop in sch.get_loops(blk):
                if int(sch.get(loop).kind) == int(tirx.ForKind.VECTORIZED):
                    sch.unroll(loop)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)

