"""Prefill of a VQ layer by "dequantize into a scratch weight, then the dense tensor-core GEMM" (long prompts) next
to the VQ tensor-core kernel (short prompts), chosen at run time in one PrimFunc (tir_kernels/cuda_dequant_gemm.py).

Without a GPU: the dequantize kernel's per-thread code, built for the CPU in serial loops over the block and thread
indices, must reproduce the reference `dequantize` (checkpoint/dequant.py) bit for bit, in the kernel's column
order (the order of the activation after its perm); the CUDA source of the branching PrimFunc must hold both paths.
The GEMM's data movement is checked by tests/test_dense_mma.py; the GPU check suite (bench kernels) runs both
branches on a GPU.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from cuda_sources import generated_cuda, kernel_definitions
from test_cuda_aot import require_cuda_toolkit

from vptq_mlc.artifact.vq_layout import generic_layout, vq_operand_shapes
from vptq_mlc.checkpoint.dequant import decode_codes, dequantize
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.testing.synthetic import random_layer

OUTL = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
CASES = {  # variant, in, out, layer kwargs: residual, outliers (scalar code loads), groups, v = 12 / 16, O % v != 0
    "v8-k256-256-outl": ("v8-k256-256", 1024, 512, OUTL),
    "v8-k256-256-groups": ("v8-k256-256", 1024, 300, {"group_num": 2}),
    "v8-k4096-0": ("v8-k4096-0", 1000, 64, {}),
    "v8-k4096-0-groups": ("v8-k4096-0", 1024, 300, {"group_num": 2}),
    "v12-k4096-0": ("v12-k4096-0", 512, 252, {}),
    "v16-k65536-65536": ("v16-k65536-65536", 256, 64, {}),
}


@pytest.mark.parametrize("smem_book", [False, True], ids=["l1-book", "smem-book"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dequantize_kernel_matches_reference_on_cpu(name, smem_book):
    import tvm

    from vptq_mlc.tir_kernels.cuda_dequant_gemm import DequantPlan, smem_book_bytes, vq_dequantize_func

    variant, i, o, kw = CASES[name]
    cfg = VPTQLayerConfig.from_variant(variant, i, o, enable_norm=False, **kw)  # the norm is not the kernel's
    plan = None
    if smem_book:  # codebooks in shared memory: 3 vector rows per CTA of 64 threads (row and chunk tails)
        if smem_book_bytes(cfg) is None:
            with pytest.raises(ValueError, match="do not fit"):
                vq_dequantize_func(cfg, "float16", cuda=False, plan=DequantPlan(64, 3, True))
            return
        plan = DequantPlan(64, 3, True)
    tensors = random_layer(cfg, np.random.default_rng(7), "float16")
    codes = decode_codes(cfg, tensors)
    ops = generic_layout(cfg, tensors, codes, "float16")
    func = vq_dequantize_func(cfg, "float16", cuda=False, plan=plan)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    dev = tvm.cpu()
    w = tvm.runtime.tensor(np.full((o, i), np.nan, np.float16), dev)
    lib["main"](*(tvm.runtime.tensor(ops[n], dev) for n in vq_operand_shapes(cfg)), w)
    ref = dequantize(cfg, tensors)  # final column order; the kernel's column k is the activation's xs[:, k]
    if codes.perm is not None:
        ref = ref[:, codes.perm]  # xs = x[:, perm], so column k of the kernel's weight is final column perm[k]
    assert ref.dtype == np.float16
    np.testing.assert_array_equal(w.numpy(), ref)


def test_prefill_cuda_source_has_both_paths():
    require_cuda_toolkit(cuobjdump=False)
    import tvm

    from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS, vq_prefill_cuda

    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 1024, 512, **OUTL)
    func, scratch = vq_prefill_cuda(cfg, "float16")
    forced, _ = vq_prefill_cuda(cfg, "float16", from_rows=0)
    assert scratch == (((512, 1024), "float16"),)
    names = [p.name for p in func.params]
    assert names[0] == "xs" and names[-2:] == ["w", "y"] and names[1:-2] == list(vq_operand_shapes(cfg))
    # shared-memory codebook with split-K warps: its reduction reuses the codebook's shared memory, and the barrier
    # between them must be in the kernel (TVM cannot insert one under the host-side row-count branch)
    split, _ = vq_prefill_cuda(VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512), "float16")
    funcs = {"pre": func, "forced": forced, "split": split}
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    host: list[str] = []

    def build(bt):
        ex = tvm.compile(mod, target=bt.target)
        host.append(ex.mod.inspect_source() if hasattr(ex.mod, "inspect_source") else "")

    kernels = kernel_definitions(generated_cuda(build))
    pre = {n: k for n, k in kernels.items() if n.startswith("pre_")}
    forced_k = {n: k for n, k in kernels.items() if n.startswith("forced_")}
    # VQ MMA with the decode plan (<= 16 rows) and with the prefill plan (lookups build B fragments), dequantize,
    # dense GEMM 64 x 64 (512-wide output), dense GEMM 128 x 128
    assert len(pre) == 5, sorted(pre)
    # every row count dequantizes (no VQ MMA kernel): dequantize + the GEMM for 1..16 rows, 64 x 64, 128 x 128
    assert len(forced_k) == 4, sorted(forced_k)
    assert all("ldmatrix" in k or "mma.sync" not in k for k in forced_k.values())
    mma = [k for k in pre.values() if "mma.sync" in k and "ldmatrix" not in k]
    gemm = [k for k in pre.values() if "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in k and "cp_async" in k]
    dequant = [k for k in pre.values() if "mma.sync" not in k]
    assert len(mma) == 2 and len(gemm) == 2 and len(dequant) == 1
    assert len([n for n in kernels if n.startswith("split_")]) == 5
    # the dequantize kernel writes 16-byte stores of the weight (uint4 of 8 halves) and reads whole entries
    assert re.search(r"\*\(uint4\*\)\(w_ptr \+", dequant[0]) and "*(uint4*)(ent_ptr" in dequant[0]
    assert DEQUANT_GEMM_FROM_ROWS == 128


def test_registry_picks_branching_prefill_for_fp16_symbolic_rows():
    from tvm.target import Target

    from vptq_mlc.tir_kernels.registry import CudaKernelSelector

    select = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"}))
    cfg = VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512)
    k = select(cfg, "float16", None)
    assert k.scratch == (((512, 1024), "float16"),)
    assert [p.name for p in k.func.params][-2:] == ["w", "y"]
    odd = VPTQLayerConfig.from_variant("v8-k4096-0", 1000, 300)  # K not a multiple of 32: the VQ MMA kernel alone
    assert select(odd, "float16", None).scratch == ()
    assert select(cfg, "float16", 8).scratch == ()  # static decode rows are untouched


def test_prefill_bench_times_both_paths_per_shape():
    from vptq_mlc.bench.kernels import prefill_cases

    cases = prefill_cases()
    for kernel in ("mma", "dequant-gemm", ""):
        assert {(c.variant, c.out_features, c.in_features, c.run_rows) for c in cases if c.kernel == kernel} == {
            (c.variant, c.out_features, c.in_features, c.run_rows) for c in cases}
    assert {c.run_rows for c in cases} == {128, 512, 2048}
