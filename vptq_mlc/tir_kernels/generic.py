"""Target-independent codebook-lookup matmul, written as a TE compute (llvm runs it unscheduled).

Computes `y[n, r] = sum_k xs[n, k] * Wpre[r, k]` where `Wpre` is the layer's pre-permutation dense weight
given implicitly by codes and codebooks (layout `generic`, docs/ARCHITECTURE.md). Permutation, norm and
biases are applied outside (see model/vptq_linear.py), so this is the only function that looks codes up.
"""

from __future__ import annotations

from tvm import te, tirx

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig


def vq_operand_shapes(cfg: VPTQLayerConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes (`"float"` = model dtype) of the generic layout's code/codebook tensors, in call order."""
    gs = cfg.group_num * cfg.group_size
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "centroids": ((cfg.group_num, cfg.num_centroids, cfg.vector_len), "float"),
        "codes": ((cfg.num_vectors, gs), "uint16"),
    }
    if cfg.has_residual:
        shapes["res_centroids"] = ((cfg.group_num, cfg.num_res_centroids, cfg.vector_len), "float")
        shapes["res_codes"] = ((cfg.num_vectors, gs), "uint16")
    if cfg.has_outliers:
        shapes["outlier_centroids"] = ((cfg.num_outlier_centroids, cfg.outlier_vector_len), "float")
        shapes["outlier_codes"] = ((cfg.num_outlier_vectors, cfg.outlier_size), "uint16")
    return shapes


def vq_matmul_generic(cfg: VPTQLayerConfig, dtype: str, n: int | tirx.Var | None = None) -> tirx.PrimFunc:
    """PrimFunc(xs[n, I], <operands of vq_operand_shapes>, y[n, O]); accumulates in float32."""
    n = tirx.Var("n", "int64") if n is None else n
    v, s, osz = cfg.vector_len, cfg.group_size, cfg.outlier_size
    ops = {
        name: te.placeholder(shape, dtype if dt == "float" else dt, name=name)
        for name, (shape, dt) in vq_operand_shapes(cfg).items()
    }
    xs = te.placeholder((n, cfg.in_features), dtype, name="xs")
    k = te.reduce_axis((0, cfg.group_num * s), name="k")

    def main(b, r):
        i, j, g = r // v, r % v, k // s
        w = ops["centroids"][g, ops["codes"][i, k].astype("int32"), j].astype("float32")
        if cfg.has_residual:
            w = w + ops["res_centroids"][g, ops["res_codes"][i, k].astype("int32"), j].astype("float32")
        return te.sum(xs[b, osz + k].astype("float32") * w, axis=k)

    acc = te.compute((n, cfg.out_features), main, name="acc_main")
    if cfg.has_outliers:
        ko = te.reduce_axis((0, osz), name="ko")
        vo = cfg.outlier_vector_len

        def outl(b, r):
            w = ops["outlier_centroids"][ops["outlier_codes"][r // vo, ko].astype("int32"), r % vo]
            return te.sum(xs[b, ko].astype("float32") * w.astype("float32"), axis=ko)

        acc_o = te.compute((n, cfg.out_features), outl, name="acc_outlier")
        y = te.compute((n, cfg.out_features), lambda b, r: (acc[b, r] + acc_o[b, r]).astype(dtype), name="y")
    else:
        y = te.compute((n, cfg.out_features), lambda b, r: acc[b, r].astype(dtype), name="y")
    func = te.create_prim_func([xs, *ops.values(), y])
    return func.without_attr("global_symbol").with_attr("tirx.noalias", True)
