"""The VQ layout table: which tensors a VPTQ layer carries in the model dir (names, order, shapes, dtypes) and how
convert computes them (layout `generic`, and `code-sorted` for large codebooks; docs/ARCHITECTURE.md).

Codes are unpacked to rows along the input dimension (`codes[i, k]`; uint8 for codebooks of <= 256 entries,
else uint16: `code_dtype`), so a kernel streams one vector row's codes contiguously; the permutation and norm
scale are re-expressed on the activation side. Convert writes these tensors, the kernels declare them as operands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vptq_mlc.checkpoint.dequant import LayerCodes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

LAYOUT = "generic"
Shapes = dict[str, tuple[tuple[int, ...], str]]  # operand name -> (shape, dtype; "float" = model dtype)


def code_dtype(num_entries: int) -> str:
    """Storage of codes into a codebook of `num_entries`: uint8 up to 256 entries (half the bytes a decode kernel
    streams, e.g. v8-k256-256), else uint16."""
    return "uint8" if num_entries <= 256 else "uint16"


def vq_operand_shapes(cfg: VPTQLayerConfig) -> Shapes:
    """Shapes and dtypes (`"float"` = model dtype) of the generic layout's code/codebook tensors, in call order."""
    gs = cfg.group_num * cfg.group_size
    shapes: Shapes = {
        "centroids": ((cfg.group_num, cfg.num_centroids, cfg.vector_len), "float"),
        "codes": ((cfg.num_vectors, gs), code_dtype(cfg.num_centroids)),
    }
    if cfg.has_residual:
        shapes["res_centroids"] = ((cfg.group_num, cfg.num_res_centroids, cfg.vector_len), "float")
        shapes["res_codes"] = ((cfg.num_vectors, gs), code_dtype(cfg.num_res_centroids))
    if cfg.has_outliers:
        shapes["outlier_centroids"] = ((cfg.num_outlier_centroids, cfg.outlier_vector_len), "float")
        shapes["outlier_codes"] = ((cfg.num_outlier_vectors, cfg.outlier_size), "uint16")
    return shapes


def _codes_2d(codes: np.ndarray, num_entries: int) -> np.ndarray:
    """[G, N, S] -> [N, G*S] (group g owns columns g*S .. g*S+S-1), stored as `code_dtype(num_entries)`."""
    g, n, s = codes.shape
    return np.ascontiguousarray(codes.transpose(1, 0, 2).reshape(n, g * s)).astype(code_dtype(num_entries))


def generic_layout(
    cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray], codes: LayerCodes, dtype: str
) -> dict[str, np.ndarray]:
    """Suffix -> array for the tensor cache (`<path>.<suffix>`), in the order the model declares them."""

    def fl(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(dtype))

    g, v = cfg.group_num, cfg.vector_len
    out: dict[str, np.ndarray] = {
        "centroids": fl(tensors["centroids.weight"]).reshape(g, cfg.num_centroids, v),
        "codes": _codes_2d(codes.idx, cfg.num_centroids),
    }
    if cfg.has_residual:
        assert codes.res is not None
        out["res_centroids"] = fl(tensors["res_centroids.weight"]).reshape(g, cfg.num_res_centroids, v)
        out["res_codes"] = _codes_2d(codes.res, cfg.num_res_centroids)
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


# ---------------------------------------------------------------- layout `code-sorted` (large codebooks, CUDA decode)
# A gather from a codebook that does not fit shared memory is walled by L2 (docs/vq-gemv-h100.md §3).
# For such layers the converter also writes every code as an *entry* grouped by codebook slice, so a CTA can hold
# one slice in shared memory and stream only the entries that look into it. Main and residual codebooks of a group
# are treated as one combined book `[C_main[g]; C_res[g]]` (combined index = code, or K + residual code): the
# residual becomes more entries of its own slices, so one kernel sums both terms exactly.
SLICE_BYTES = 64 * 1024  # one slice per CTA: fits every default arch (sm_86/sm_89 allow 99 KB per block)
CODE_SORTED = "code-sorted"
# A residual book much smaller than the main one would become one or two slices holding an entry for every code
# (16-30x the work of the other slices). Up to this size it is *folded* instead: entries come from the main codes
# only, a parallel array `cs_res` holds each entry's residual code, and every CTA keeps the whole residual book in
# shared memory next to its slice (64 + 16 KiB).
FOLD_RES_BYTES = 16 * 1024


@dataclass(frozen=True)
class CodeSortedGeometry:
    """Sizes of one layer's code-sorted tensors; a function of the layer config and dtype only (the model declares
    them as parameters without seeing data)."""

    slice_entries: int  # SE: codebook entries per slice
    slices_per_group: int  # NSG = ceil((K + Kr) / SE)
    num_slices: int  # G * NSG; global slice gs = g * NSG + s
    code_bits: int  # entry = (column << code_bits) | local code; local code SE = padding (a zero entry)
    num_vectors: int  # N
    entry_capacity: int  # uint32 entries (multiple of 4): every code once per term + up to 3 pads per list
    columns: int = 0  # G * S main columns
    res_dtype: str | None = None  # folded residual: `cs_res` dtype (uint8 for Kr <= 256, else uint16); None: unfolded

    @property
    def folded(self) -> bool:
        return self.res_dtype is not None

    @property
    def pad_entry(self) -> int:
        """Padding: local code SE (a zero entry). Folded lists also point the column past the end (G * S), where
        the kernel reads a zero activation, so the pad's residual term (code 0) adds nothing."""
        return (self.columns << self.code_bits) | self.slice_entries if self.folded else self.slice_entries

    @property
    def num_lists(self) -> int:
        return self.num_slices * self.num_vectors


def code_sorted_eligible(cfg: VPTQLayerConfig, dtype: str) -> bool:
    """True when the layer's codebooks (main + residual, all groups) do not fit the decode GEMV's shared memory."""
    el = np.dtype(dtype).itemsize
    return cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * el > SLICE_BYTES


def folds_residual(cfg: VPTQLayerConfig, dtype: str) -> bool:
    """A residual book small enough to sit in every CTA's shared memory (FOLD_RES_BYTES) and smaller than the main
    one (an equal-sized one is balanced as slices of the combined book)."""
    el = np.dtype(dtype).itemsize
    kr = cfg.num_res_centroids
    return cfg.has_residual and kr < cfg.num_centroids and kr * cfg.vector_len * el <= FOLD_RES_BYTES


def code_sorted_geometry(cfg: VPTQLayerConfig, dtype: str) -> CodeSortedGeometry:
    el = np.dtype(dtype).itemsize
    se = SLICE_BYTES // (cfg.vector_len * el)
    fold = folds_residual(cfg, dtype)
    nsg = -(-(cfg.num_centroids + (0 if fold else cfg.num_res_centroids)) // se)
    ns = cfg.group_num * nsg
    bits = se.bit_length()  # codes 0..SE (SE = padding)
    length = cfg.group_num * cfg.group_size
    if length >= 1 << (32 - bits):
        raise ValueError(f"{length} columns do not fit a code-sorted entry with {bits} code bits")
    terms = 2 if cfg.has_residual and not fold else 1
    cap = cfg.num_vectors * length * terms + 3 * ns * cfg.num_vectors
    res_dtype = ("uint8" if cfg.num_res_centroids <= 256 else "uint16") if fold else None
    return CodeSortedGeometry(se, nsg, ns, bits, cfg.num_vectors, -(-cap // 4) * 4, length, res_dtype)


def code_sorted_shapes(cfg: VPTQLayerConfig, dtype: str) -> Shapes:
    """Extra tensor-cache entries of the code-sorted layout (besides the generic ones, which it reuses for the
    codebooks and outliers): `cs_entries` uint32 and `cs_offsets` int32 (start of each list, in 4-entry chunks)."""
    geo = code_sorted_geometry(cfg, dtype)
    shapes = {"cs_entries": ((geo.entry_capacity,), "uint32"), "cs_offsets": ((geo.num_lists + 1,), "int32")}
    if geo.folded:
        shapes["cs_res"] = ((geo.entry_capacity,), geo.res_dtype)
    return shapes


def code_sorted_layout(cfg: VPTQLayerConfig, codes: LayerCodes, dtype: str) -> dict[str, np.ndarray]:
    """`cs_entries`, `cs_offsets` of one layer. List (gs, i) (index gs * N + i) holds, in column order, one entry
    `(k << code_bits) | (c - s * SE)` for every column k of vector row i whose combined code c in group g falls
    in slice s; lists are padded with `pad_entry` to a multiple of 4 entries (16-byte loads) and start at
    `4 * cs_offsets[gs * N + i]`. Unused capacity at the end holds padding too."""
    geo = code_sorted_geometry(cfg, dtype)
    G, N, S = codes.idx.shape
    se, nsg = geo.slice_entries, geo.slices_per_group
    terms = [codes.idx.astype(np.int64)]
    if cfg.has_residual and not geo.folded:
        assert codes.res is not None
        terms.append(codes.res.astype(np.int64) + cfg.num_centroids)
    comb = np.stack(terms)  # [T, G, N, S] combined codes
    g = np.arange(G, dtype=np.int64)[None, :, None, None]
    i = np.arange(N, dtype=np.int64)[None, None, :, None]
    k = (g * S + np.arange(S, dtype=np.int64)[None, None, None, :])
    key = ((g * nsg + comb // se) * N + i).ravel()  # list index
    val = np.broadcast_to((k << geo.code_bits), comb.shape).ravel() | (comb % se).ravel()
    order = np.argsort(key, kind="stable")  # stable: each list keeps (term, column) order
    key_s = key[order]
    counts = np.bincount(key, minlength=geo.num_lists)
    chunks = -(-counts // 4)
    offsets = np.zeros(geo.num_lists + 1, np.int64)
    np.cumsum(chunks, out=offsets[1:])
    starts = np.zeros(geo.num_lists, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    pos = offsets[key_s] * 4 + (np.arange(key_s.size, dtype=np.int64) - starts[key_s])
    entries = np.full(geo.entry_capacity, geo.pad_entry, np.uint32)
    entries[pos] = val[order].astype(np.uint32)
    assert offsets[-1] * 4 <= geo.entry_capacity
    out = {"cs_entries": entries, "cs_offsets": offsets.astype(np.int32)}
    if geo.folded:  # each entry's residual code, at the entry's position (pads: 0, times a zero activation)
        assert codes.res is not None
        res = np.zeros(geo.entry_capacity, geo.res_dtype)
        res[pos] = codes.res.astype(np.int64).ravel()[order]
        out["cs_res"] = res
    return out
