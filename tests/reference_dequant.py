"""Independent reference for VPTQ unpacking and dequantization, written from vptq-format.md sections 3-4 only.

Deliberately shares no code with vptq_mlc.checkpoint: it takes the raw LayerCfg dict (microsoft/VPTQ key names),
derives every size itself, reads packed codes with the 64-bit window rule of section 3 (one fancy-indexed read
per code, not the package's phase-sliced loop) and evaluates the per-element formula of section 4 for every
(row, column) of W at once (not gather-then-permute). Rounding follows the torch path: residual add, norm multiply
and norm add each rounded in the centroids' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def _u(a: np.ndarray) -> np.ndarray:
    """Unsigned value of stored codes (int16 holds uint16 bits, int32 holds uint32 bits)."""
    a = np.asarray(a)
    if a.dtype == np.int16:
        a = a.view(np.uint16)
    elif a.dtype == np.int32:
        a = a.view(np.uint32)
    return a.astype(np.int64)


def ref_sizes(c: Mapping[str, Any]) -> dict[str, int]:
    vo, v = c["vector_lens"]
    ko, k = c["num_centroids"]
    kr = c["num_res_centroids"][1]
    O, I = c["out_features"], c["in_features"]
    ib = int(math.log2(k))
    rb = int(math.log2(kr)) if kr > 0 else 0
    S = c["group_size"]
    outl = vo > 1 and ko > 0
    return {
        "v": v, "K": k, "Kr": kr, "vo": vo, "Ko": ko, "O": O, "I": I, "G": c["group_num"], "S": S,
        "osz": c["outlier_size"], "ib": ib, "rb": rb, "tb": ib + rb, "N": (O + (-O) % v) // v,
        "P": math.ceil(S * (ib + rb) / 32), "outliers": int(outl), "No": (O + (-O) % vo) // vo if outl else 0,
    }


def ref_unpack(words: np.ndarray, ib: int, rb: int, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Section 3 read rule: w = word[p//32] | word[p//32+1] << 32; m = (w >> p%32) & (2^tb-1)."""
    w = _u(words).astype(np.uint64)
    w = np.concatenate([w, np.zeros(w.shape[:-1] + (1,), np.uint64)], axis=-1)  # missing next word reads 0
    tb = ib + rb
    p = np.arange(S, dtype=np.int64) * tb
    window = w[..., p // 32] | (w[..., p // 32 + 1] << np.uint64(32))
    m = (window >> (p % 32).astype(np.uint64)) & np.uint64((1 << tb) - 1)
    return (m & np.uint64((1 << ib) - 1)).astype(np.int64), (m >> np.uint64(ib)).astype(np.int64)


def ref_pack(idx: np.ndarray, res: np.ndarray | None, ib: int, rb: int) -> np.ndarray:
    """Section 3 write rule, bit by bit (slow; for small test shapes only)."""
    S = idx.shape[-1]
    tb = ib + rb
    m = _u(idx) | ((_u(res) << ib) if res is not None else 0)
    P = math.ceil(S * tb / 32)
    bits = ((m[..., :, None] >> np.arange(tb)) & 1).reshape(*m.shape[:-1], S * tb)
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (P * 32 - S * tb,), np.int64)], axis=-1)
    words = (bits.reshape(*m.shape[:-1], P, 32) << np.arange(32)).sum(-1)
    return words.astype(np.uint32).view(np.int32)


def ref_dequant(c: Mapping[str, Any], t: Mapping[str, np.ndarray]) -> np.ndarray:
    """W[O, I] from a LayerCfg dict and the layer's tensors (short names), per-element form of section 4."""
    z = ref_sizes(c)
    v, O, I, S, osz = z["v"], z["O"], z["I"], z["S"], z["osz"]
    C = np.asarray(t["centroids.weight"])
    dt = C.dtype
    if c["is_indice_packed"]:
        idx, res = ref_unpack(t["indices"], z["ib"], z["rb"], S)
    else:
        idx = _u(t["indices"])
        res = _u(t["res_indices"]) if z["Kr"] > 0 else None
    perm = _u(t["perm"]) if c["enable_perm"] else np.arange(I)
    inv = np.argsort(perm)
    r = np.arange(O)[:, None]  # output row
    k = inv[None, :].repeat(O, 0)  # pre-perm column of each final column
    W = np.zeros((O, I), dt)
    main = k >= osz
    kk = np.where(main, k - osz, 0)
    g, j, i = kk // S, kk % S, np.broadcast_to(r // v, (O, I))
    Cg = C.reshape(z["G"], z["K"], v)
    w = Cg[g, idx[g, i, j], r % v]
    if z["Kr"] > 0:
        Crg = np.asarray(t["res_centroids.weight"]).reshape(z["G"], z["Kr"], v)
        w = (w + Crg[g, res[g, i, j], r % v]).astype(dt)
    W[main] = w[main]
    if z["outliers"]:
        vo = z["vo"]
        Co = np.asarray(t["outlier_centroids.weight"])[0].reshape(z["Ko"], vo)
        oidx = _u(t["outlier_indices"])[0]
        ko = np.where(main, 0, k)
        wo = Co[oidx[np.broadcast_to(r // vo, (O, I)), ko], np.broadcast_to(r % vo, (O, I))]
        W[~main] = wo[~main]
    if c["enable_norm"]:
        W = (W * np.asarray(t["weight_scale"])[None, :]).astype(dt)
        W = (W + np.asarray(t["weight_bias"])[None, :]).astype(dt)
    return W
