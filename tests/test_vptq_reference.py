"""Cross-check against microsoft's `vptq` package (0.0.5.post1), pure-torch path (its CUDA library cannot load on CPU).

We build `VQuantLinear` layers, load our synthetic tensors with a strict `load_state_dict` (so our names, shapes and
dtypes are exactly the package's), and compare its dequantized weight and forward with ours. Without the package
(`pip install --no-deps vptq==0.0.5.post1`) the tests skip with the reason, and fail in CI (tests/required.py).
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
from required import import_required, missing

from vptq_mlc.checkpoint.dequant import dequantize
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.packing import pack_indices
from vptq_mlc.testing.synthetic import random_layer

torch = import_required("torch", 'pip install -e ".[test]"')


def _import_vptq():
    """Import vptq's layer and ops modules. `vptq.utils.pack` imports sentence_transformers at module level for
    an unrelated tool; when that package is absent we register an empty stand-in so the import succeeds (nothing
    on the dequant path touches it)."""
    try:
        importlib.import_module("sentence_transformers")
    except ImportError:
        st = types.ModuleType("sentence_transformers")
        sub = types.ModuleType("sentence_transformers.SentenceTransformer")
        sub.SentenceTransformer = object
        st.SentenceTransformer = sub
        sys.modules.setdefault("sentence_transformers", st)
        sys.modules.setdefault("sentence_transformers.SentenceTransformer", sub)
    try:
        vq = importlib.import_module("vptq.layers.vqlinear")
        ops = importlib.import_module("vptq.ops.quant_gemm")
        pack = importlib.import_module("vptq.utils.pack")
    except ImportError as e:  # anything else is a real failure of the package or of our stand-in
        missing(f"vptq package not importable ({type(e).__name__}: {e}); "
                "pip install --no-deps vptq==0.0.5.post1 accelerate")
    return vq, ops, pack


@pytest.fixture(scope="module")
def vptq_mods():
    return _import_vptq()




def _torch_dtype(name: str):
    return {"float32": torch.float32, "float16": torch.float16}[name]


def _build(vq, cfg: VPTQLayerConfig, dtype: str):
    j = cfg.to_json()
    return vq.VQuantLinear(
        in_features=j["in_features"],
        out_features=j["out_features"],
        vector_lens=j["vector_lens"],
        num_centroids=j["num_centroids"],
        num_res_centroids=j["num_res_centroids"],
        group_num=j["group_num"],
        group_size=j["group_size"],
        outlier_size=j["outlier_size"],
        indices_as_float=False,
        enable_norm=j["enable_norm"],
        enable_perm=j["enable_perm"],
        is_indice_packed=j["is_indice_packed"],
        bias=j["bias"],
        dtype=_torch_dtype(dtype),
        enable_proxy_error=False,
    )


def _package_dequant(ops, layer, perm=None):
    """The package's own torch dequant on the layer's parameters (what forward uses without CUDA)."""
    return ops.dequant(
        indices=layer.indices,
        centroids=layer.centroids.weight.view(layer.num_codebooks, layer.num_centroids, layer.vector_len),
        outlier_indices=layer.outlier_indices,
        outlier_centroids=(
            layer.outlier_centroids.weight.view(1, layer.num_outlier_centroids, layer.outlier_vector_len)
            if layer.enable_outlier else None
        ),
        res_indices=layer.res_indices,
        res_centroids=layer.res_centroids.weight if layer.enable_residual else None,
        perm=perm if perm is not None else getattr(layer, "perm", None),
        weight_scale=layer.weight_scale,
        weight_bias=layer.weight_bias,
        is_indice_packed=layer.is_indice_packed,
        enable_outlier=layer.enable_outlier,
        enable_residual=layer.enable_residual,
        enable_perm=layer.enable_perm,
        enable_norm=layer.enable_norm,
        num_centroids=layer.num_centroids,
        num_outlier_centroids=layer.num_outlier_centroids,
        num_res_centroids=layer.num_res_centroids,
        padding=layer.padding,
        outlier_padding=layer.outlier_padding,
        num_codebooks=layer.num_codebooks,
        group_size=layer.group_size,
        outlier_size=layer.outlier_size,
        vector_len=layer.vector_len,
        outlier_vector_len=layer.outlier_vector_len,
    )


CASES = {
    "v8-k65536-256 recipe": ("v8-k65536-256", {}),
    "v8-k65536-0 recipe": ("v8-k65536-0", {}),
    "v16-k65536-65536 recipe": ("v16-k65536-65536", {}),
    "v12-k65536-4096 recipe": ("v12-k65536-4096", {}),
    "v8-k4096-4096 outliers+G2+bias": (
        "v8-k4096-4096",
        dict(outlier_size=16, outlier_vector_len=4, num_outlier_centroids=16, group_num=2, bias=True),
    ),
    "v8-k512-512 ib9": ("v8-k512-512", dict(bias=True)),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_layer_matches_vqlinear(vptq_mods, case, dtype):
    vq, ops, _ = vptq_mods
    variant, kw = CASES[case]
    cfg = VPTQLayerConfig.from_variant(variant, 64, 40, **kw)
    t = random_layer(cfg, np.random.default_rng(7), dtype)
    layer = _build(vq, cfg, dtype)
    sd = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in t.items()}
    layer.load_state_dict(sd, strict=True)  # names, shapes and dtypes exactly the package's
    for k, a in layer.state_dict().items():
        assert a.dtype == sd[k].dtype, k
    with torch.no_grad():
        ref_w = _package_dequant(ops, layer).numpy()
        ours = dequantize(cfg, t)
        np.testing.assert_array_equal(ours, ref_w)
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 64)).astype(dtype))
        y = layer(x).numpy()
    W = ours.astype(np.float64)
    y_ref = x.numpy().astype(np.float64) @ W.T + (t["bias"].astype(np.float64) if cfg.bias else 0)
    tol = 2e-2 if dtype == "float16" else 1e-5
    np.testing.assert_allclose(y.astype(np.float64), y_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_unpacked_layer_matches_vqlinear(vptq_mods, dtype):
    """Unpacked, no residual (0.0.5 cannot build an unpacked layer with a residual). The package reads an int64
    perm as uint16 and crashes (a known bug), so its dequant is given the same perm as int16."""
    vq, ops, _ = vptq_mods
    cfg = VPTQLayerConfig.from_variant(
        "v8-k4096-0", 64, 40, is_indice_packed=False, bias=True,
        outlier_size=16, outlier_vector_len=4, num_outlier_centroids=16, group_num=2,
    )
    t = random_layer(cfg, np.random.default_rng(11), dtype)
    assert t["perm"].dtype == np.int64 and t["indices"].dtype == np.int16
    layer = _build(vq, cfg, dtype)
    layer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in t.items()}, strict=True)
    perm16 = torch.from_numpy(t["perm"].astype(np.uint16).view(np.int16))
    with torch.no_grad():
        ref_w = _package_dequant(ops, layer, perm=perm16).numpy()
    np.testing.assert_array_equal(dequantize(cfg, t), ref_w)


@pytest.mark.parametrize("variant",
                         ["v8-k65536-65536", "v8-k65536-256", "v8-k512-512", "v8-k4096-0", "v16-k65536-32768"])
def test_pack_index_matches_package(vptq_mods, variant):
    """Our packer's words equal the package's `pack_index` (main + residual codes, S = 61 straddles words)."""
    _, _, pack = vptq_mods
    cfg = VPTQLayerConfig.from_variant(variant, 61, 16)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, cfg.num_centroids, (1, 2, 61))
    res = rng.integers(0, cfg.num_res_centroids, idx.shape) if cfg.has_residual else None
    t_idx = torch.from_numpy(idx.astype(np.uint16).view(np.int16))
    t_res = torch.from_numpy(res.astype(np.uint16).view(np.int16)) if res is not None else None
    words = pack.pack_index(t_idx, cfg.index_bits, t_res, cfg.res_bits)
    np.testing.assert_array_equal(pack_indices(idx, res, cfg), words.numpy())
