"""Bit-packing of VPTQ index codes into int32 words (vptq-format.md section 3).

Each row of `S` codes (one group, one output-vector row) is packed on its own: code `j` occupies stream bits
`j*tb .. j*tb+tb-1` (main code in the low `ib` bits, residual above), stream bit `p` is bit `p % 32` of word
`p // 32`. Vectorised by "phase": codes `j` with the same `j mod (lcm(tb, 32) / tb)` start at the same bit offset
inside their word and hit words that are a fixed stride apart, so each phase is one strided numpy slice. That keeps
a 4096x14336 layer to a fraction of a second and memory to a few copies of the code array.
"""

from __future__ import annotations

import math

import numpy as np

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import CheckpointError


def _phases(tb: int) -> tuple[int, int]:
    """(codes per period, words per period): after `period` codes the bit offset inside a word repeats."""
    lcm = tb * 32 // math.gcd(tb, 32)
    return lcm // tb, lcm // 32


def pack_indices(idx: np.ndarray, res: np.ndarray | None, cfg: VPTQLayerConfig) -> np.ndarray:
    """Pack main codes `idx [G,N,S]` (and residual codes `res`, iff the layer has a residual) into int32 `[G,N,P]`."""
    ib, rb, tb = cfg.index_bits, cfg.res_bits, cfg.total_bits
    idx = np.asarray(idx)
    if idx.ndim != 3 or idx.shape[2] != cfg.group_size:
        raise CheckpointError(f"pack_indices: codes must be [G, N, {cfg.group_size}], got {list(idx.shape)}")
    m = idx.astype(np.int64)
    if m.size and (m.min() < 0 or m.max() >= 1 << ib):
        raise CheckpointError(f"pack_indices: main codes must lie in [0, {1 << ib}), got [{m.min()}, {m.max()}]")
    if cfg.has_residual:
        if res is None or np.shape(res) != idx.shape:
            raise CheckpointError(f"pack_indices: residual codes of shape {list(idx.shape)} required")
        r = np.asarray(res).astype(np.int64)
        if r.size and (r.min() < 0 or r.max() >= 1 << rb):
            raise CheckpointError(
                f"pack_indices: residual codes must lie in [0, {1 << rb}), got [{r.min()}, {r.max()}]"
            )
        m = m | (r << ib)
    elif res is not None:
        raise CheckpointError("pack_indices: residual codes given but the layer has no residual codebook")
    m = m.astype(np.uint64)
    G, N, S = m.shape
    period, wper = _phases(tb)
    nper = -(-S // period)
    if nper * period != S:  # zero codes contribute zero bits
        m = np.concatenate([m, np.zeros((G, N, nper * period - S), np.uint64)], axis=2)
    words = np.zeros((G, N, nper * wper + 1), np.uint64)
    lo_mask = np.uint64(0xFFFFFFFF)
    for r in range(period):
        w0, shift = divmod(r * tb, 32)
        v = m[:, :, r::period] << np.uint64(shift)  # at most 63 bits
        stop = w0 + nper * wper
        words[:, :, w0:stop:wper] |= v & lo_mask
        if shift + tb > 32:
            words[:, :, w0 + 1 : stop + 1 : wper] |= v >> np.uint64(32)
    return words[:, :, : cfg.packed_words].astype(np.uint32).view(np.int32)


def unpack_indices(packed: np.ndarray, cfg: VPTQLayerConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of `pack_indices`: int32/uint32 words `[G,N,P]` -> (main codes, residual codes or None), int32
    `[G,N,S]`."""
    ib, tb, S, P = cfg.index_bits, cfg.total_bits, cfg.group_size, cfg.packed_words
    packed = np.asarray(packed)
    if packed.ndim != 3 or packed.shape[2] != P or packed.dtype.itemsize != 4 or packed.dtype.kind not in "iu":
        raise CheckpointError(
            f"unpack_indices: packed codes must be int32 [G, N, {P}], got {packed.dtype} {list(packed.shape)}"
        )
    G, N, _ = packed.shape
    period, wper = _phases(tb)
    nper = -(-S // period)
    words = np.zeros((G, N, nper * wper + 1), np.uint64)
    words[:, :, :P] = packed.view(np.uint32)
    m = np.empty((G, N, nper * period), np.uint64)
    mask = np.uint64((1 << tb) - 1)
    for r in range(period):
        w0, shift = divmod(r * tb, 32)
        stop = w0 + nper * wper
        v = words[:, :, w0:stop:wper]
        if shift + tb > 32:
            v = v | (words[:, :, w0 + 1 : stop + 1 : wper] << np.uint64(32))
        m[:, :, r::period] = (v >> np.uint64(shift)) & mask
    m = m[:, :, :S]
    idx = (m & np.uint64((1 << ib) - 1)).astype(np.int32)
    res = (m >> np.uint64(ib)).astype(np.int32) if cfg.has_residual else None
    return idx, res


def padding_bits_clear(packed: np.ndarray, cfg: VPTQLayerConfig) -> bool:
    """True if the unused high bits of each row's last word are zero (the format requires it)."""
    used = cfg.group_size * cfg.total_bits - (cfg.packed_words - 1) * 32
    if used >= 32:
        return True
    last = np.asarray(packed)[..., -1].view(np.uint32)
    return not np.any(last >> np.uint32(used))
