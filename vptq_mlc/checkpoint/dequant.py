"""Decoding a VPTQ layer's codes and rebuilding its dense weight (vptq-format.md sections 2-4).

`dequantize` is the package's one dense-weight function (tests, `inspect`, eval, fallbacks all call it). It follows
the torch path of microsoft/VPTQ, rounding in the tensors' float dtype after every op (residual add, norm multiply,
norm add), which makes it bit-exact against that path in fp16 and fp32. bf16 checkpoints reach us widened to
float32 (numpy has no bf16), so for them the result is the fp32 computation of the bf16 values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.packing import unpack_indices
from vptq_mlc.checkpoint.schema import as_unsigned, expected_tensors
from vptq_mlc.errors import CheckpointError


@dataclass
class LayerCodes:
    """One layer's codes, unpacked and as unsigned values (int32 codes, int64 perm)."""

    idx: np.ndarray  # [G, N, S] main codes
    res: np.ndarray | None  # [G, N, S] residual codes, None without a residual codebook
    outlier_idx: np.ndarray | None  # [No, osz] outlier codes, None without outliers
    perm: np.ndarray | None  # [I]: pre-perm column k holds final input column perm[k]; None without perm


def _need(cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in tensors or tensors[name] is None:
        raise CheckpointError(f"layer {where}: tensor {name!r} missing (required by its config)")
    a = np.asarray(tensors[name])
    spec = expected_tensors(cfg).get(name)
    if spec is not None and tuple(a.shape) != spec.shape:
        raise CheckpointError(
            f"layer {where}: tensor {name!r} expected shape {list(spec.shape)}, found {list(a.shape)}"
        )
    return a


def decode_codes(cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray], where: str = "?") -> LayerCodes:
    """Unpack (or reinterpret) the index tensors of one layer; packed and unpacked layouts both supported."""
    if not cfg.enable_perm and tensors.get("perm") is not None:
        raise CheckpointError(
            f"layer {where}: a 'perm' tensor is present but enable_perm is false (a broken perm-folding rewrite?); "
            "fix config.json or drop the tensor"
        )
    ind = _need(cfg, tensors, "indices", where)
    if cfg.is_indice_packed:
        if ind.dtype not in (np.int32, np.uint32):
            raise CheckpointError(f"layer {where}: tensor 'indices' expected int32 (packed), found {ind.dtype}")
        idx, res = unpack_indices(ind, cfg)
    else:
        if ind.dtype.kind not in "iu":
            raise CheckpointError(f"layer {where}: tensor 'indices' expected int16, found {ind.dtype}")
        idx = as_unsigned(ind).astype(np.int32)
        res = as_unsigned(_need(cfg, tensors, "res_indices", where)).astype(np.int32) if cfg.has_residual else None
    oidx = None
    if cfg.has_outliers:
        oidx = as_unsigned(_need(cfg, tensors, "outlier_indices", where))[0].astype(np.int32)
    perm = as_unsigned(_need(cfg, tensors, "perm", where)) if cfg.enable_perm else None
    return LayerCodes(idx=idx, res=res, outlier_idx=oidx, perm=perm)


def _float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError(f"expected a float tensor, got {a.dtype}")
    return a


def _check_range(codes: np.ndarray, n: int, what: str, where: str) -> None:
    if codes.size and int(codes.max()) >= n:
        raise CheckpointError(f"layer {where}: {what} code {int(codes.max())} out of range for a codebook of {n}")


def dequantize(cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray], where: str = "?") -> np.ndarray:
    """Dense weight `[O, I]` of one VPTQ linear, in the dtype of its centroids (then `y = x @ W.T + bias`).

    The permutation is applied to the (small, integer) codes before the lookup, so every final column is gathered
    straight from its codebook entry: no float scatter, which matters at 4096x14336. Values are unchanged by that
    (gathers are exact); the residual add and the norm multiply/add each round in the float dtype, like torch.
    """
    codes = decode_codes(cfg, tensors, where)
    G, N, S, v, O, I = cfg.group_num, cfg.num_vectors, cfg.group_size, cfg.vector_len, cfg.out_features, cfg.in_features
    osz = cfg.outlier_size
    cent = _float(_need(cfg, tensors, "centroids.weight", where))
    dt = cent.dtype
    _check_range(codes.idx, cfg.num_centroids, "main", where)
    if cfg.has_residual:
        _check_range(codes.res, cfg.num_res_centroids, "residual", where)
    if codes.perm is not None:
        perm = codes.perm
        if perm.size != I or not np.array_equal(np.sort(perm), np.arange(I)):
            raise CheckpointError(f"layer {where}: tensor 'perm' is not a permutation of 0..{I - 1}")
        k = np.argsort(perm)  # final column c holds pre-perm column k[c]
    else:
        k = np.arange(I)
    main_cols = np.nonzero(k >= osz)[0] if osz else None
    km = (k[main_cols] if osz else k) - osz
    g_c, j_c = km // S, km % S

    def lookup(table: np.ndarray, n: int, codes_gns: np.ndarray, rows: slice) -> np.ndarray:
        """[n_rows, M, v] entries of `table` ([G, n*v]) for the codes of the final main columns."""
        if G == 1:
            return table.reshape(n, v)[codes_gns[0, rows][:, j_c]]
        flat = g_c[None, :] * n + codes_gns[g_c[None, :], np.arange(N)[rows, None], j_c[None, :]]
        return table.reshape(G * n, v)[flat]

    res_c = None
    if cfg.has_residual:
        res_c = _float(_need(cfg, tensors, "res_centroids.weight", where)).astype(dt, copy=False)
    scale = wbias = None
    if cfg.enable_norm:
        scale = _float(_need(cfg, tensors, "weight_scale", where)).astype(dt, copy=False)
        wbias = _float(_need(cfg, tensors, "weight_bias", where)).astype(dt, copy=False)
    W = np.empty((O, I), dt)
    # work in blocks of vector rows that fit in cache (a big win in fp16, where numpy is slow)
    step = max(1, (1 << 20) // max(1, v * I * dt.itemsize))
    for i0 in range(0, N, step):
        rows = slice(i0, min(N, i0 + step))
        vals = lookup(cent, cfg.num_centroids, codes.idx, rows)
        if res_c is not None:
            vals = vals + lookup(res_c, cfg.num_res_centroids, codes.res, rows)  # rounded in dt, as torch does
        blk = vals.transpose(0, 2, 1).reshape(-1, vals.shape[1])[: O - i0 * v]  # row i*v+r: element r of vector i
        if osz:
            W[i0 * v : i0 * v + blk.shape[0], main_cols] = blk
        else:
            dst = W[i0 * v : i0 * v + blk.shape[0]]
            dst[:] = blk
            if scale is not None:  # norm per block while it is in cache (rounded in dt)
                np.multiply(dst, scale[None, :], out=dst)
                np.add(dst, wbias[None, :], out=dst)
    if osz:
        vo, No = cfg.outlier_vector_len, cfg.num_outlier_vectors
        Co = _float(_need(cfg, tensors, "outlier_centroids.weight", where)).astype(dt, copy=False)
        _check_range(codes.outlier_idx, cfg.num_outlier_centroids, "outlier", where)
        out_cols = np.nonzero(k < osz)[0]
        ov = Co.reshape(cfg.num_outlier_centroids, vo)[codes.outlier_idx[:, k[out_cols]]]  # [No, n_out, vo]
        W[:, out_cols] = ov.transpose(0, 2, 1).reshape(No * vo, -1)[:O]
        if scale is not None:
            np.multiply(W, scale[None, :], out=W)  # rounded in dt
            np.add(W, wbias[None, :], out=W)
    return W


def linear_forward(cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """`x @ W.T + bias` with the dequantized weight (a reference for kernels; computed in float32)."""
    W = dequantize(cfg, tensors).astype(np.float32)
    y = np.asarray(x, np.float32) @ W.T
    if cfg.bias:
        y = y + np.asarray(tensors["bias"], np.float32)
    return y
