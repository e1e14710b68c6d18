"""Layout `code-sorted` (K = 65536 class codebooks, CUDA decode): the written entries decode back to the dense
weight of the independent spec reference (tests/reference_dequant.py), and models with such layers still build.

The entry format is decoded here from its documented definition (docs/ARCHITECTURE.md, convert/ table), not with
any vptq_mlc decoding code. About 10 s (the CUDA build test needs nvcc and takes ~40 s more on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_dequant import ref_dequant
from test_cuda_aot import require_cuda_toolkit

from vptq_mlc.artifact.vq_layout import (
    code_sorted_eligible,
    code_sorted_geometry,
    code_sorted_layout,
    code_sorted_shapes,
    generic_layout,
)
from vptq_mlc.checkpoint.dequant import decode_codes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.testing.synthetic import random_layer

OUTL = {"outlier_size": 16, "outlier_vector_len": 4, "num_outlier_centroids": 64}


def _decode_entries(cfg: VPTQLayerConfig, lay: dict, cs: dict, dtype: str) -> np.ndarray:
    """W_pre[O, I] (pre-permutation columns, no norm) from cs_entries/cs_offsets + the codebooks, per the spec:
    list l = gs * N + i starts at entry 4 * offsets[l]; entry = (k << bits) | local, local == SE is padding;
    combined code c = (gs % NSG) * SE + local indexes [centroids[g]; res_centroids[g]], g = gs // NSG.
    Folded residual (`cs_res` present): the combined book is the main book alone and the entry at position p also
    adds res_centroids[g][cs_res[p]]; its pads point at column G * S (past the row)."""
    v, O, osz, N = cfg.vector_len, cfg.out_features, cfg.outlier_size, cfg.num_vectors
    K = cfg.num_centroids
    se = code_sorted_geometry(cfg, dtype).slice_entries
    folded = "cs_res" in cs
    nsg = -(-(K + (0 if folded else cfg.num_res_centroids)) // se)
    books = [np.concatenate([lay["centroids"][g]] + ([lay["res_centroids"][g]] if cfg.has_residual else []))
             for g in range(cfg.group_num)]
    code_bits = se.bit_length()
    off = cs["cs_offsets"].astype(np.int64)
    ent = cs["cs_entries"].astype(np.int64)
    terms = np.zeros((2, N * v, cfg.in_features), np.float64)  # main / residual terms summed separately
    seen = np.zeros((N, cfg.in_features), np.int64)
    for lst in range(len(off) - 1):
        gs, i = divmod(lst, N)
        g, s = divmod(gs, nsg)
        for p in range(4 * off[lst], 4 * off[lst + 1]):
            local, k = ent[p] & ((1 << code_bits) - 1), ent[p] >> code_bits
            if local == se:
                assert not folded or k == cfg.group_num * cfg.group_size
                continue
            c = s * se + local
            terms[int(c >= K), i * v: i * v + v, osz + k] = books[g][c]
            seen[i, osz + k] += 1
            if folded:
                terms[1, i * v: i * v + v, osz + k] = books[g][K + int(cs["cs_res"][p])]
                seen[i, osz + k] += 1
    assert (seen[:, osz:] == (2 if cfg.has_residual else 1)).all(), "every code must appear once per term"
    cdt = lay["centroids"].dtype
    W = terms[0].astype(cdt)
    if cfg.has_residual:
        W = (W + terms[1].astype(cdt)).astype(cdt)
    W = W[:O]
    if cfg.has_outliers:
        vo = cfg.outlier_vector_len
        r = np.arange(O)[:, None]
        W[:, :osz] = lay["outlier_centroids"][lay["outlier_codes"][r // vo, np.arange(osz)[None, :]], r % vo]
    return W


@pytest.mark.parametrize("variant,dtype,kw", [
    ("v8-k65536-0", "float16", {"enable_norm": False}),
    ("v8-k65536-256", "float32", OUTL),  # folded residual (uint8 cs_res)
    ("v8-k65536-256", "float16", {"group_num": 2}),
    ("v8-k65536-1024", "float16", {}),  # folded, uint16 cs_res
    ("v12-k65536-4096", "float32", {"group_num": 2}),
    ("v16-k65536-65536", "float32", {}),
    ("v8-k8192-0", "float16", {"enable_perm": False}),
])
def test_entries_decode_to_the_reference_weight(variant, dtype, kw):
    cfg = VPTQLayerConfig.from_variant(variant, 96 if kw.get("group_num") else 80, 36, **kw)
    t = random_layer(cfg, np.random.default_rng(7), dtype)
    codes = decode_codes(cfg, t)
    lay = generic_layout(cfg, t, codes, dtype)
    cs = code_sorted_layout(cfg, codes, dtype)
    shapes = code_sorted_shapes(cfg, dtype)
    for name, (shape, dt) in shapes.items():  # what the model declares without seeing data
        assert cs[name].shape == shape and cs[name].dtype == np.dtype(dt)
    off = cs["cs_offsets"]
    assert off[0] == 0 and (np.diff(off) >= 0).all() and 4 * off[-1] <= cs["cs_entries"].size
    wpre = _decode_entries(cfg, lay, cs, dtype)
    # final column perm[k] holds pre-perm column k; then the norm (scale, bias) as the spec applies it
    W = np.zeros_like(wpre)
    perm = codes.perm if codes.perm is not None else np.arange(cfg.in_features)
    W[:, perm] = wpre
    if cfg.enable_norm:
        W = (W * t["weight_scale"][None, :]).astype(W.dtype)
        W = (W + t["weight_bias"][None, :]).astype(W.dtype)
    ref = ref_dequant(cfg.to_json(), t)
    np.testing.assert_array_equal(W, ref)


def test_which_layers_get_the_layout():
    f = VPTQLayerConfig.from_variant
    assert code_sorted_eligible(f("v8-k65536-0", 64, 64), "float16")
    assert code_sorted_eligible(f("v8-k4096-256", 64, 64), "float16")  # 68 KiB of codebooks
    assert not code_sorted_eligible(f("v8-k4096-0", 64, 64), "float16")  # 64 KiB: the GEMV's shared memory
    assert code_sorted_geometry(f("v8-k65536-0", 4096, 4096), "float16").slice_entries == 4096  # 64 KiB slices
    assert code_sorted_geometry(f("v16-k65536-65536", 4096, 4096), "float16").num_slices == 64


@pytest.fixture(scope="module")
def k65536_model(tmp_path_factory):
    """A tiny converted fp16 model whose linears are v8-k65536-0 (code-sorted entries written)."""
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    d = tmp_path_factory.mktemp("k65536")
    ckpt = make_synthetic_checkpoint(d / "ckpt", variant="v8-k65536-0", hidden_size=64, intermediate_size=128,
                                     num_layers=1, vocab_size=320)
    return convert_checkpoint(ckpt, d / "mlc", dtype="float16")


def _param_names(model_dir, target_kind: str) -> list[str]:
    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.model.builder import build_model
    from vptq_mlc.model.config import DecoderConfig

    chat = ChatConfig.load(model_dir)
    backend = resolve_backend(target_kind)[0]
    model = build_model(DecoderConfig.from_json(chat.model_config), chat.vptq_layers(), chat.model_dtype,
                        backend.target, backend.kernel_selector(chat.layouts))
    _, params = model.export_tvm(spec=model.get_default_spec())
    return [n for n, _ in params]


def test_converter_writes_entries_and_only_cuda_declares_them(k65536_model):
    import json

    from vptq_mlc.artifact.tensor_cache import read_index

    chat = json.loads((k65536_model / "mlc-chat-config.json").read_text())
    assert chat["vptq"]["layouts"] == ["generic", "code-sorted"]
    index = read_index(k65536_model)
    q = "model.layers.0.self_attn.q_proj"
    assert {f"{q}.cs_entries", f"{q}.cs_offsets", f"{q}.codes"} <= set(index)
    cpu = _param_names(k65536_model, "llvm")
    assert not any(".cs_" in n for n in cpu)  # the CPU library is unchanged
    gpu = _param_names(k65536_model, "cuda")
    assert f"{q}.cs_entries" in gpu and set(cpu) <= set(gpu)


def test_registry_routes_only_balanced_layers_to_code_sorted():
    """K = 65536 without residual, with an equal residual, or with a residual small enough to fold (<= 16 KiB)
    take the code-sorted kernel; a mid-sized residual (v12-k65536-4096: 96 KiB) would be one overloaded slice, so
    such layers keep the gather GEMV and do not declare (load) their entries."""
    from tvm.target import Target

    from vptq_mlc.tir_kernels.registry import CudaKernelSelector

    sel = CudaKernelSelector(Target("cuda"), ("generic", "code-sorted"))
    f = VPTQLayerConfig.from_variant
    for variant, want in (("v8-k65536-0", True), ("v16-k65536-65536", True), ("v8-k65536-256", True),
                          ("v12-k65536-4096", False), ("v8-k4096-0", False)):
        cfg = f(variant, 256, 128)
        assert ("cs_entries" in sel.operand_shapes(cfg, "float16")) == want, variant
    assert "cs_entries" not in CudaKernelSelector(Target("cuda")).operand_shapes(f("v8-k65536-0", 256, 128), "float16")


def test_cuda_library_builds_with_code_sorted_layers(k65536_model, tmp_path):
    """Compile only (no GPU): decode and batch_decode_b2 take the code-sorted kernel, the rest the other kernels."""
    require_cuda_toolkit()
    from vptq_mlc.compile.build import compile_model

    (lib,) = compile_model(k65536_model, "cuda", tmp_path / "m-cuda.so", arch="sm_80", static_batches=(2,))
    assert lib.stat().st_size > 0
    from vptq_mlc.compile.fatbin import inspect_library

    rep = inspect_library(lib)
    assert rep.archs == ["sm_80"] and not rep.cuda_source
    # the code-sorted PrimFunc lowers to two kernels, the slice pass and its reduce pass (`<func>_kernel_1`)
    assert b"_kernel_1" in lib.read_bytes()


@pytest.mark.parametrize("variant", ["v8-k65536-0", "v8-k65536-256"])
def test_random_weights_give_valid_code_sorted_tensors(variant):
    """Benchmarks with random weights (`bench e2e` on config-only dirs) need code-sorted tensors a kernel can walk:
    the declared shapes/dtypes, offsets that partition the entries, in-range local codes and columns."""
    from vptq_mlc.bench.random_weights import RandomTensors

    cfg = VPTQLayerConfig.from_variant(variant, 96, 64)
    geo = code_sorted_geometry(cfg, "float16")
    draw = RandomTensors({"m.l": cfg}, np.random.default_rng(0), "float16")
    got = {leaf: draw.tensor(f"m.l.{leaf}", list(shape), dt) for leaf, (shape, dt) in
           code_sorted_shapes(cfg, "float16").items()}
    assert ("cs_res" in got) == (variant == "v8-k65536-256")
    off, ent = got["cs_offsets"].astype(np.int64), got["cs_entries"].astype(np.int64)
    assert off[0] == 0 and (np.diff(off) >= 0).all() and 4 * off[-1] <= ent.size
    local, col = ent & ((1 << geo.code_bits) - 1), ent >> geo.code_bits
    pads = local == geo.slice_entries
    assert (local <= geo.slice_entries).all() and (col[~pads] < cfg.group_num * cfg.group_size).all()
    assert (~pads).sum() == cfg.num_vectors * cfg.group_num * cfg.group_size  # every code once (main term only)
    if "cs_res" in got:
        assert got["cs_res"].max() < cfg.num_res_centroids
