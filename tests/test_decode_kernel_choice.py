"""Which decode kernel serves which static batch on CUDA, and how the engine cuts a running batch into the
library's static sizes (no compile: the registry's choice and the engine's arithmetic only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS
from vptq_mlc.tir_kernels.cuda_mma import mma_preferred


@pytest.mark.parametrize("batch,pieces", [(1, [1]), (3, [3]), (8, [8]), (9, [8, 1]), (11, [8, 3]), (12, [12]),
                                          (13, [12, 1]), (16, [16]), (20, [16, 4]), (33, [16, 16, 1])])
def test_decode_pieces_use_static_sizes_largest_first(batch: int, pieces: list[int]) -> None:
    static = {n: object() for n in (1, *range(2, 9), 12, 16)}  # CUDA's decode + batch_decode_b2..b8, b12, b16
    fake = SimpleNamespace(_static_decode=static)
    assert [len(p) for p in Engine._decode_pieces(fake, list(range(batch)))] == pieces


def test_decode_pieces_without_static_sizes_is_one_call() -> None:
    fake = SimpleNamespace(_static_decode={1: object()})  # llvm: `decode` only; batches use symbolic batch_decode
    assert [len(p) for p in Engine._decode_pieces(fake, list(range(7)))] == [7]


@pytest.mark.parametrize("variant,rows,want", [
    ("v8-k4096-0", 4, False), ("v8-k4096-0", 6, True), ("v8-k4096-0", 16, True),
    # residual: cuda_mma.py looks up each element twice, GEMV up to 8 (the registry takes the whole-entry kernel
    # from 6 rows where it serves: test_residual_books_in_shared_memory_take_the_tensor_core_kernel_from_6_rows)
    ("v8-k256-256", 8, False), ("v8-k256-256", 12, True),
    ("v16-k65536-65536", 8, False), ("v16-k65536-65536", 16, True),
    ("v8-k65536-0", 8, True),
])
def test_tensor_core_kernel_choice(variant: str, rows: int, want: bool) -> None:
    cfg = VPTQLayerConfig.from_variant(variant, 4096, 4096)
    assert mma_preferred(cfg, "float16", rows, MAX_ROWS) is want
    assert not mma_preferred(cfg, "float32", rows, MAX_ROWS)  # fp16 MMA only


@pytest.mark.parametrize("variant", ["v8-k4096-0", "v8-k256-256", "v8-k65536-0", "v16-k65536-65536"])
def test_tensor_core_plans_fit_every_default_arch(variant: str) -> None:
    """One CUDA library serves sm_80..sm_90, so every MMA plan (decode rows and symbolic-row prefill) must stay
    within sm_86/sm_89's 99 KB of dynamic shared memory; vq_mma_cuda raises otherwise."""
    from vptq_mlc.tir_kernels.cuda_mma import vq_mma_cuda

    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008), (53248, 16384), (300, 1000)):
        cfg = VPTQLayerConfig.from_variant(variant, in_f, out_f)
        for rows in (None, 6, 16):
            vq_mma_cuda(cfg, "float16", rows)


@pytest.mark.parametrize("variant", ["v8-k256-256", "v8-k256-0", "v8-k512-0", "v8-k4096-0", "v12-k4096-0",
                                     "v16-k65536-65536", "v4-k256-0"])
def test_gemv_plans_fit_every_default_arch(variant: str) -> None:
    """The GEMV's shared memory (codebooks, 8 copies when replicated, plus the split reduction) stays within the
    99 KB of sm_86/sm_89 for every decode row count; only 16-byte entries of books <= 8 KB are replicated (lane l
    reads copy l % 8: conflict-free), and fp16 partial sums are used on CUDA for fp16 with <= 96 accumulators."""
    from vptq_mlc.artifact.vq_layout import code_dtype
    from vptq_mlc.tir_kernels.cuda_gemv import REPLICAS, plan_gemv, wavefront_params

    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008), (300, 1000)):
        cfg = VPTQLayerConfig.from_variant(variant, in_f, out_f)
        for dtype, el in (("float16", 2), ("float32", 4)):
            book = cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * el
            for rows in range(1, MAX_ROWS + 1):
                p = plan_gemv(cfg, rows, dtype)
                smem = book * p.replicas * p.smem_codebook + p.rows_per_cta * p.splits * rows * cfg.vector_len * 4
                assert smem <= 99 * 1024, (variant, out_f, in_f, dtype, rows, p)
                assert (p.replicas == REPLICAS) == (cfg.vector_len * el == 16 and book <= 8 * 1024), p
                assert p.half_acc == (dtype == "float16" and rows * cfg.vector_len <= 96), p
    assert code_dtype(256) == "uint8" and code_dtype(257) == "uint16"
    from tvm.target import Target

    rocm = plan_gemv(VPTQLayerConfig.from_variant("v8-k256-256", 4096, 4096), 1, "float16",
                     wavefront_params(Target({"kind": "rocm", "mcpu": "gfx942", "mtriple": "amdgcn-amd-amdhsa-hcc"})))
    assert rocm.replicas == 1 and not rocm.half_acc  # neither was measured on AMD hardware


@pytest.mark.parametrize("variant,rows,count,want", [
    ("v8-k4096-0", 1, 3, True), ("v8-k4096-0", 5, 2, True), ("v8-k256-256", 5, 3, True),
    ("v8-k4096-0", 6, 2, False), ("v8-k256-256", 8, 3, False),  # the tensor-core kernel from 6 rows: one launch
    # per layer (here: too few outputs for its register-fragment launch of several layers)
    ("v8-k4096-0", None, 2, False),  # prefill: per layer
    ("v8-k4096-0", 1, 4, False), ("v8-k4096-0", 1, 1, False),  # 2..3 layers per launch
])
def test_shared_gemv_choice(variant: str, rows: int | None, count: int, want: bool) -> None:
    """Layers of one config reading the same activation share a launch only where their own kernel is the GEMV;
    the shared kernel takes each layer's generic operands, and the choice is cached (one PrimFunc per group shape)."""
    from tvm.target import Target

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes
    from vptq_mlc.tir_kernels.registry import CudaKernelSelector, KernelSelector

    sel = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_80"}))
    cfg = VPTQLayerConfig.from_variant(variant, 1024, 512)
    k = sel.shared(cfg, "float16", rows, count)
    assert (k is not None) is want
    if want:
        assert k is sel.shared(cfg, "float16", rows, count)
        assert k.operands == tuple(vq_operand_shapes(cfg)) and not k.scratch
        assert len(k.func.params) == count * (1 + len(k.operands)) + count
    assert KernelSelector(Target("llvm")).shared(cfg, "float16", rows, count) is None


def test_shared_register_fragment_choice(monkeypatch) -> None:
    """With VPTQ_MLC_REGISTER_TILES=1, q/k/v (3 x 4096) and gate/up (2 x 11008) of a 7B layer at the tensor-core
    decode rows share one launch of the register-fragment kernel (each layer's generic operands, then the outputs);
    a group under 8192 outputs, a K = 65536 book and the switch off keep one launch per layer."""
    from tvm.target import Target

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes
    from vptq_mlc.tir_kernels.cuda_mma_wide import REGISTER_TILES_ENV
    from vptq_mlc.tir_kernels.registry import CudaKernelSelector

    monkeypatch.setenv(REGISTER_TILES_ENV, "1")
    sel = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_80"}))
    for (i, o), count in (((4096, 4096), 3), ((4096, 11008), 2)):
        cfg = VPTQLayerConfig.from_variant("v8-k4096-0", i, o)
        for rows in (8, 16):
            k = sel.shared(cfg, "float16", rows, count)
            assert k is not None and k.operands == tuple(vq_operand_shapes(cfg)) and not k.scratch
            assert len(k.func.params) == count * (1 + len(k.operands)) + count
            assert "ldmatrix" not in k.func.script()  # register fragments, not the tile form
    assert sel.shared(VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512), "float16", 16, 3) is None
    assert sel.shared(VPTQLayerConfig.from_variant("v8-k65536-256", 4096, 4096), "float16", 16, 3) is None
    monkeypatch.setenv(REGISTER_TILES_ENV, "0")
    off = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_80"}))
    assert off.shared(VPTQLayerConfig.from_variant("v8-k4096-0", 4096, 4096), "float16", 16, 3) is None


def test_two_launch_tensor_core_choice(monkeypatch) -> None:
    """At the tensor-core decode rows the registry's fused linear is the whole-entry kernel's two-launch form
    (VPTQ_MLC_TWO_LAUNCH_MMA, on by default): q/k/v of a 7B layer in one call (register fragments, the xs / dot of
    each layer as scratch outputs), o_proj alone in the tile form (with CTA splits off: the next test); a K = 65536
    book, several layers in the tile form, the switch off, or a layer without norm give None (the separate kernels);
    the GEMV rows keep the GEMV's two-launch form."""
    from tvm.target import Target

    from vptq_mlc.tir_kernels.cuda_mma_wide import CTA_SPLITS_ENV
    from vptq_mlc.tir_kernels.fused_input import FusedInput
    from vptq_mlc.tir_kernels.registry import TWO_LAUNCH_MMA_ENV, CudaKernelSelector

    monkeypatch.delenv(TWO_LAUNCH_MMA_ENV, raising=False)
    monkeypatch.setenv(CTA_SPLITS_ENV, "0")
    sel = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"}))
    qkv = VPTQLayerConfig.from_variant("v8-k4096-0", 4096, 4096, enable_norm=True)
    opts = FusedInput("rmsnorm", 1e-5, concat=True)
    k = sel.fused(qkv, "float16", 16, (True, True, True), opts)
    assert k is not None and len(k.scratch) == 6
    script = k.func.script()
    assert "ptx_legacy.mma" in script and "ldmatrix" not in script  # register fragments
    o_proj = sel.fused(qkv, "float16", 16, (True,), FusedInput(residual=True))
    assert o_proj is not None and "ldmatrix" in o_proj.func.script()  # 4096 outputs alone: the tile form
    # a K = 65536 book (through L1/L2) keeps the separate kernels, and so do several layers in the tile form
    big = VPTQLayerConfig.from_variant("v8-k65536-256", 4096, 4096, enable_norm=True)
    assert sel.fused(big, "float16", 16, (True,), FusedInput(residual=True)) is None
    small = VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512, enable_norm=True)
    assert sel.fused(small, "float16", 16, (True, True), FusedInput("rmsnorm", 1e-5)) is None
    assert sel.fused(small, "float16", 16, (True,), FusedInput("rmsnorm", 1e-5)) is not None
    plain = VPTQLayerConfig.from_variant("v8-k4096-0", 4096, 4096, enable_norm=False)
    assert sel.fused(plain, "float16", 16, (True,), opts) is None
    k1 = sel.fused(qkv, "float16", 1, (True, True, True), opts)
    assert k1 is not None and "ptx_legacy.mma" not in k1.func.script()  # batch 1: the GEMV
    monkeypatch.setenv(TWO_LAUNCH_MMA_ENV, "0")
    assert CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"})).fused(qkv, "float16", 16, (True,) * 3,
                                                                              opts) is None


def test_residual_books_in_shared_memory_take_the_tensor_core_kernel_from_6_rows(monkeypatch) -> None:
    """v8-k256-256 (both books in shared memory, the whole-entry kernel's lookups) runs the tensor-core kernel from 6
    rows; a K = 65536 residual book (read through L1/L2), fp32, or VPTQ_MLC_MMA_WIDE=0 (cuda_mma.py, two lookups per
    weight) keep the GEMV up to 8 rows."""
    from tvm.target import Target

    from vptq_mlc.tir_kernels.cuda_mma_wide import MMA_WIDE_ENV
    from vptq_mlc.tir_kernels.registry import CudaKernelSelector

    monkeypatch.delenv(MMA_WIDE_ENV, raising=False)
    sel = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"}))
    small = VPTQLayerConfig.from_variant("v8-k256-256", 4096, 4096)
    big = VPTQLayerConfig.from_variant("v8-k65536-256", 4096, 4096)
    assert [sel._decode_family(small, "float16", r) for r in (5, 6, 8, 12)] == ["gemv", "mma", "mma", "mma"]
    assert sel._decode_family(big, "float16", 8) == "gemv" and sel._decode_family(small, "float32", 8) == "gemv"
    assert "ptx_legacy.mma" in sel(small, "float16", 8).func.script()
    monkeypatch.setenv(MMA_WIDE_ENV, "0")
    assert CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"}))._decode_family(small, "float16", 8) == "gemv"


def test_short_two_launch_layers_take_register_fragments_over_cta_splits(monkeypatch) -> None:
    """o_proj and down_proj of a 7B layer (4096 outputs: 64 warp rows) at the tensor-core rows with
    VPTQ_MLC_CTA_SPLITS=1 (off by default: the tile form): register fragments over 4 CTAs per row block, with the
    CTAs' partials [4, rows, 4096] fp32 and one int32 counter per row block as scratch after xs / dot; residual books
    too. Layers too short for 2 CTAs per row block, K = 65536 books (through L1/L2), several layers and the switch
    off keep their forms."""
    from tvm.target import Target

    from vptq_mlc.tir_kernels.cuda_mma_wide import CTA_SPLITS_ENV, plan_cta_splits
    from vptq_mlc.tir_kernels.fused_input import FusedInput
    from vptq_mlc.tir_kernels.registry import TWO_LAUNCH_MMA_ENV, CudaKernelSelector

    monkeypatch.delenv(TWO_LAUNCH_MMA_ENV, raising=False)
    monkeypatch.delenv(CTA_SPLITS_ENV, raising=False)
    res = FusedInput(residual=True)
    o_proj = VPTQLayerConfig.from_variant("v8-k4096-0", 4096, 4096, enable_norm=True)
    default = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"})).fused(o_proj, "float16", 16, (True,), res)
    assert len(default.scratch) == 2 and "ldmatrix" in default.func.script()  # off by default: the tile form
    monkeypatch.setenv(CTA_SPLITS_ENV, "1")
    sel = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"}))
    for variant, i, rows in (("v8-k4096-0", 4096, 16), ("v8-k4096-0", 11008, 16), ("v8-k256-256", 4096, 8)):
        cfg = VPTQLayerConfig.from_variant(variant, i, 4096, enable_norm=True)
        assert plan_cta_splits(cfg, rows).cta_splits == 4 and plan_cta_splits(cfg, rows).register_tiles
        k = sel.fused(cfg, "float16", rows, (True,), res)
        assert k is not None and k.scratch[2:] == (((4, rows, 4096), "float32"), ((64,), "int32")), k.scratch
        script = k.func.script()
        assert "atomicAdd" in script and "ldmatrix" not in script
    small = VPTQLayerConfig.from_variant("v8-k4096-0", 256, 256, enable_norm=True)  # 4 chunks: one CTA per block
    assert plan_cta_splits(small, 16).cta_splits == 1
    assert len(sel.fused(small, "float16", 16, (True,), res).scratch) == 2
    big = VPTQLayerConfig.from_variant("v8-k65536-256", 4096, 4096, enable_norm=True)
    assert sel.fused(big, "float16", 16, (True,), res) is None
    qkv = VPTQLayerConfig.from_variant("v8-k4096-0", 4096, 4096, enable_norm=True)
    assert len(sel.fused(qkv, "float16", 16, (True,) * 3, FusedInput("rmsnorm", 1e-5, concat=True)).scratch) == 6
    monkeypatch.setenv(CTA_SPLITS_ENV, "0")
    off = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"})).fused(qkv, "float16", 16, (True,), res)
    assert off is not None and len(off.scratch) == 2 and "ldmatrix" in off.func.script()
