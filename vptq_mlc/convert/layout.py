"""The kernel layout of one VPTQ layer (layout `generic`, docs/ARCHITECTURE.md), computed once at convert time.

Codes are unpacked to uint16 rows along the input dimension (`codes[i, k]`), so a kernel streams one
vector row's codes contiguously; the permutation and norm scale are re-expressed on the activation side.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vptq_mlc.checkpoint.dequant import LayerCodes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

LAYOUT = "generic"


def _codes_2d(codes: np.ndarray) -> np.ndarray:
    """[G, N, S] -> [N, G*S] uint16 (group g owns columns g*S .. g*S+S-1)."""
    g, n, s = codes.shape
    return np.ascontiguousarray(codes.transpose(1, 0, 2).reshape(n, g * s)).astype(np.uint16)


def generic_layout(
    cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray], codes: LayerCodes, dtype: str
) -> dict[str, np.ndarray]:
    """Suffix -> array for the tensor cache (`<path>.<suffix>`), in the order the model declares them."""

    def fl(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(dtype))

    g, v = cfg.group_num, cfg.vector_len
    out: dict[str, np.ndarray] = {
        "centroids": fl(tensors["centroids.weight"]).reshape(g, cfg.num_centroids, v),
        "codes": _codes_2d(codes.idx),
    }
    if cfg.has_residual:
        assert codes.res is not None
        out["res_centroids"] = fl(tensors["res_centroids.weight"]).reshape(g, cfg.num_res_centroids, v)
        out["res_codes"] = _codes_2d(codes.res)
    if cfg.has_outliers:
        assert codes.outlier_idx is not None
        vo = cfg.outlier_vector_len
        out["outlier_centroids"] = fl(tensors["outlier_centroids.weight"]).reshape(cfg.num_outlier_centroids, vo)
        out["outlier_codes"] = np.ascontiguousarray(codes.outlier_idx.astype(np.uint16))
    perm = codes.perm if codes.perm is not None else None
    if cfg.enable_perm:
        assert perm is not None
        out["perm"] = perm.astype(np.int32)
    if cfg.enable_norm:
        scale = np.asarray(tensors["weight_scale"], dtype=np.float32)
        out["col_scale"] = fl(scale[perm] if perm is not None else scale)
        out["weight_bias"] = fl(tensors["weight_bias"])
    if cfg.bias:
        out["bias"] = fl(tensors["bias"])
    return out
