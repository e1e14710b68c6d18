"""Index packing and dequantization against the independent numpy reference written from the spec."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest
from reference_dequant import ref_dequant, ref_pack, ref_unpack

from vptq_mlc.checkpoint.dequant import decode_codes, dequantize
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.packing import pack_indices, unpack_indices
from vptq_mlc.errors import CheckpointError
from vptq_mlc.testing.synthetic import random_layer


def _cfg(variant: str, i_f: int = 64, o_f: int = 40, **kw) -> VPTQLayerConfig:
    return VPTQLayerConfig.from_variant(variant, i_f, o_f, **kw)


# ---- packing ----


def test_worked_example():
    """vptq-format.md section 3: S=4, ib=8, rb=4 -> words 0x03502A01, 0x00001FFF."""
    cfg = _cfg("v8-k256-16", 4, 8, enable_perm=False, enable_norm=False)
    idx = np.array([[[1, 2, 3, 255]]])
    res = np.array([[[0xA, 0x5, 0xF, 0x1]]])
    packed = pack_indices(idx, res, cfg)
    assert packed.dtype == np.int32 and packed.shape == (1, 1, 2)
    assert packed.ravel().tolist() == [55585281, 8191]
    assert packed.view(np.uint32).ravel().tolist() == [0x03502A01, 0x00001FFF]
    i2, r2 = unpack_indices(packed, cfg)
    assert i2.dtype == np.int32 and r2.dtype == np.int32
    assert i2.tolist() == idx.tolist() and r2.tolist() == res.tolist()


@pytest.mark.parametrize(
    "variant,S",
    [
        ("v8-k65536-65536", 37),  # tb = 32
        ("v8-k65536-256", 64),  # 24
        ("v8-k65536-4", 33),  # 18
        ("v8-k512-512", 50),  # 18, ib = 9
        ("v8-k1024-512", 29),  # 19 (odd)
        ("v8-k65536-0", 16),  # 16
        ("v8-k32768-0", 31),  # 15
        ("v8-k4096-0", 7),  # 12
        ("v16-k65536-32768", 45),  # 31
        ("v4-k2-0", 1),  # 1 bit, a single code per row
        ("v4-k16-4", 3),  # 6 bits, S*tb < 32
    ],
)
def test_pack_matches_reference(variant, S):
    cfg = _cfg(variant, S, 16, enable_perm=False, enable_norm=False)
    rng = np.random.default_rng(1)
    shape = (2, 3, S)
    idx = rng.integers(0, cfg.num_centroids, shape)
    idx[0, 0, :] = cfg.num_centroids - 1  # all ones: exercises word straddling
    res = rng.integers(0, cfg.num_res_centroids, shape) if cfg.has_residual else None
    if res is not None:
        res[0, 0, :] = cfg.num_res_centroids - 1
    packed = pack_indices(idx, res, cfg)
    assert packed.shape == (2, 3, cfg.packed_words) and packed.dtype == np.int32
    np.testing.assert_array_equal(packed, ref_pack(idx, res, cfg.index_bits, cfg.res_bits))
    i2, r2 = unpack_indices(packed, cfg)
    ri, rr = ref_unpack(packed, cfg.index_bits, cfg.res_bits, S)
    np.testing.assert_array_equal(i2, idx)
    np.testing.assert_array_equal(i2, ri)
    if res is None:
        assert r2 is None
    else:
        np.testing.assert_array_equal(r2, res)
        np.testing.assert_array_equal(r2, rr)


def test_pack_rejects_out_of_range_and_wrong_residual():
    cfg = _cfg("v8-k256-0", 8, 8)
    with pytest.raises(CheckpointError):
        pack_indices(np.full((1, 1, 8), 256), None, cfg)
    with pytest.raises(CheckpointError):
        pack_indices(np.zeros((1, 1, 8)), np.zeros((1, 1, 8)), cfg)


def test_pack_large_layer_is_fast():
    """A 4096x14336 down_proj at 4 bits/weight packs and unpacks in seconds."""
    cfg = _cfg("v8-k65536-65536", 14336, 4096)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 65536, (1, cfg.num_vectors, cfg.group_size), dtype=np.int32)
    res = rng.integers(0, 65536, idx.shape, dtype=np.int32)
    t = time.perf_counter()
    packed = pack_indices(idx, res, cfg)
    i2, r2 = unpack_indices(packed, cfg)
    assert time.perf_counter() - t < 10
    assert np.array_equal(i2, idx) and np.array_equal(r2, res)


# ---- dequantization vs the reference ----

VARIANTS = ["v8-k65536-256", "v8-k65536-0", "v16-k65536-65536", "v12-k65536-4096", "v8-k4096-4096"]
FLAVOURS = {
    # published recipe: one group, perm + norm
    "recipe": dict(),
    # everything at once: outliers, two groups, perm, norm, bias (out 40 is not a multiple of v or vo=6)
    "full": dict(outlier_size=16, outlier_vector_len=6, num_outlier_centroids=16, group_num=2, bias=True),
    "bare": dict(enable_perm=False, enable_norm=False),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_dequant_matches_reference(variant, flavour, packed, dtype):
    cfg = _cfg(variant, 64, 40, is_indice_packed=packed, **FLAVOURS[flavour])
    rng = np.random.default_rng(zlib.crc32(f"{variant}{flavour}{packed}{dtype}".encode()))
    t = random_layer(cfg, rng, dtype)
    W = dequantize(cfg, t)
    assert W.shape == (40, 64) and W.dtype == np.dtype(dtype)
    R = ref_dequant(cfg.to_json(), t)
    assert R.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(W, R)  # bit-exact


def test_dequant_negative_controls():
    """Applying perm the wrong way round or norm before perm must not match (the reference is sensitive)."""
    cfg = _cfg("v8-k256-16", 64, 40)
    t = random_layer(cfg, np.random.default_rng(3), "float32")
    W = dequantize(cfg, t)
    bare = dequantize(_cfg("v8-k256-16", 64, 40, enable_perm=False, enable_norm=False),
                      {k: t[k] for k in ("centroids.weight", "res_centroids.weight", "indices")})
    perm = t["perm"].view(np.uint16).astype(np.int64)
    s, b = t["weight_scale"], t["weight_bias"]
    wrong_perm = bare[:, perm] * s + b
    norm_first = np.empty_like(bare)
    norm_first[:, perm] = bare * s + b
    good = np.empty_like(bare)
    good[:, perm] = bare
    np.testing.assert_array_equal(W, good * s + b)
    assert not np.allclose(W, wrong_perm) and not np.allclose(W, norm_first)


def test_decode_codes_reinterprets_unsigned():
    """int16 storage of uint16 codes/perm >= 32768 must read as large positive values."""
    cfg = _cfg("v8-k65536-0", 40000, 8, is_indice_packed=True)
    t = random_layer(cfg, np.random.default_rng(0), "float16")
    assert t["perm"].dtype == np.int16 and t["perm"].min() < 0
    codes = decode_codes(cfg, t)
    assert codes.perm.dtype == np.int64 and codes.perm.min() == 0 and codes.perm.max() == 39999
    assert codes.idx.dtype == np.int32 and codes.idx.max() >= 32768 and codes.res is None
    ucfg = _cfg("v8-k65536-0", 128, 8, is_indice_packed=False)
    ut = random_layer(ucfg, np.random.default_rng(0), "float16")
    assert ut["indices"].dtype == np.int16 and ut["perm"].dtype == np.int64
    uc = decode_codes(ucfg, ut)
    np.testing.assert_array_equal(uc.idx, ut["indices"].view(np.uint16))


def test_decode_codes_outliers_layout():
    cfg = _cfg("v8-k256-0", 64, 40, outlier_size=16, outlier_vector_len=4, num_outlier_centroids=16, group_num=2)
    t = random_layer(cfg, np.random.default_rng(0), "float32")
    c = decode_codes(cfg, t)
    assert c.idx.shape == (2, 5, 24) and c.outlier_idx.shape == (10, 16) and c.outlier_idx.dtype == np.int32


def test_perm_present_but_disabled_fails_loudly():
    cfg = _cfg("v8-k256-0", 64, 40, enable_perm=False)
    t = random_layer(cfg, np.random.default_rng(0), "float32")
    t["perm"] = np.arange(64, dtype=np.int16)
    with pytest.raises(CheckpointError, match="enable_perm is false") as e:
        dequantize(cfg, t, where="model.layers.0.mlp.up_proj")
    assert "\n" not in str(e.value) and "model.layers.0.mlp.up_proj" in str(e.value)


def test_dequant_shape_errors_are_one_line():
    cfg = _cfg("v8-k256-0", 64, 40)
    t = random_layer(cfg, np.random.default_rng(0), "float32")
    t["indices"] = t["indices"][:, :-1]
    with pytest.raises(CheckpointError, match="'indices' expected shape") as e:
        dequantize(cfg, t)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flavour", ["recipe", "full"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dequant_matches_reference_across_row_blocks(flavour, dtype):
    """Wide layers are dequantized in blocks of vector rows; the last block is partial (O=203, v=8)."""
    cfg = _cfg("v8-k4096-16", 4096 + 16, 203, **FLAVOURS[flavour]) if flavour == "full" else \
        _cfg("v8-k4096-16", 4096, 203)
    t = random_layer(cfg, np.random.default_rng(9), dtype)
    np.testing.assert_array_equal(dequantize(cfg, t), ref_dequant(cfg.to_json(), t))
