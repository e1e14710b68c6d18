"""The generated CUDA source of representative hand-written kernels is exactly the recorded one.

Why: the kernels are assembled from shared `@T.macro` pieces (tir_kernels/cuda_common.py); a change to a piece
changes several kernels at once, and on the build box nothing runs them. The digests below were recorded from the
kernels as written out inline before the pieces were shared, so they pin the code TVM generates: a deliberate
schedule change (or a TVM upgrade) must re-record them (`python3 tests/test_kernel_source_digest.py` prints the
new table) after the GPU check suite passes, and bench/kernel_sources.py compares every variant of two trees.
TVM codegen only (CUDA source, no nvcc run); ~20 s on 2 cores.
"""

from __future__ import annotations

import hashlib

import pytest
from cuda_sources import generated_cuda, kernel_parts
from test_cuda_aot import require_cuda_toolkit

# name -> sha256 of the kernel's CUDA source (from `extern "C" __global__` to the next one), TVM 0.27.0.post1
RECORDED = {
    "cs_f16_v8_k65536_256_r2_kernel": "6d55fee32cfe9d6475759b1c0928fd84d21d4e4ada2f13136dbefa39ed48d37a",
    "cs_f16_v8_k65536_256_r2_kernel_1": "51061e801a43087665a8e7c66639d9cfb863002a2b29a592f99e9208dcde4730",
    "gemv_f16_v8_k256_256_r1_kernel": "782afc2cdf059d5cfac9c7c2d41cabeaff0e2fe5a7299a69b99cb12ade5026bb",
    "gemv_f32_v8_k65536_0_r2_outl_kernel": "be40c2aa3c5c34f376d2b64b251947b898cc7e4077751088c909cd55cdc52b3d",
    "mma_f16_v12_k65536_4096_prefill_kernel": "a1a5a34d3f6d8e93844466335809ddc1ac3eddc2e158c3775af80ac6411360d8",
    "mma_f16_v8_k4096_0_r8_kernel": "d9b9486602960d86ff05fffd84fa22ea181582d486fbbc19229a33248e7cc2ad",
    "prologue_f16_1000_perm_kernel": "c00b87662c1f6b7f42fe89cacca51e9e69786a325a9d4390207fb157955558aa",
    # added with the shared prologue and GEMV (q/k/v, gate/up in one launch each); the kernels above are unchanged
    "prologue_shared_f16_4096_pnp_kernel": "af0628a5b1a1e06b3b56aac3eafe3dea1de714e002569bcb659dfb027751930f",
    "gemv_shared3_f16_v8_k4096_0_r1_kernel": "a049cd74b5ed2e64af2b71c1a5ee822244bbd3678dce9e7d4292cf7b6b527bb4",
}


def _kernels() -> dict:
    """Each macro in each kernel family: replicated shared-memory book + residual (gemv fp16), books read through
    L1/L2 with outliers (gemv fp32), direct shared-memory fill, vector and scalar (MMA decode, prefill with
    residual and v = 12), folded residual + team reduction (code-sorted), one-warp reduction (prologue; the shared
    prologue of three linears, one without a permutation), the GEMV over three layers in one launch."""
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.tir_kernels.cuda_code_sorted import vq_code_sorted_cuda
    from vptq_mlc.tir_kernels.cuda_gemv import vq_gemv_cuda
    from vptq_mlc.tir_kernels.cuda_mma import vq_mma_cuda
    from vptq_mlc.tir_kernels.cuda_prologue import vq_prologue_cuda, vq_shared_prologue_cuda

    def cfg(variant, i, o, **kw):
        return VPTQLayerConfig.from_variant(variant, i, o, **kw)

    outl = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
    return {
        "gemv_f16_v8_k256_256_r1": vq_gemv_cuda(cfg("v8-k256-256", 1024, 512), "float16", 1),
        "gemv_f32_v8_k65536_0_r2_outl": vq_gemv_cuda(cfg("v8-k65536-0", 1024, 512, **outl), "float32", 2),
        "mma_f16_v8_k4096_0_r8": vq_mma_cuda(cfg("v8-k4096-0", 1024, 512), "float16", 8),
        "mma_f16_v12_k65536_4096_prefill": vq_mma_cuda(cfg("v12-k65536-4096", 1020, 252), "float16", None),
        "cs_f16_v8_k65536_256_r2": vq_code_sorted_cuda(cfg("v8-k65536-256", 1024, 512), "float16", 2),
        "prologue_f16_1000_perm": vq_prologue_cuda(1000, "float16", True),
        "prologue_shared_f16_4096_pnp": vq_shared_prologue_cuda(4096, "float16", (True, False, True)),
        "gemv_shared3_f16_v8_k4096_0_r1": vq_gemv_cuda(cfg("v8-k4096-0", 1024, 512), "float16", 1, count=3),
    }


def kernel_digests() -> dict[str, str]:
    import tvm

    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in _kernels().items()})
    src = generated_cuda(lambda bt: tvm.compile(mod, target=bt.target), "sm_90")
    # a name met twice (a forward declaration, then the definition): the later text, as when recorded
    return {name: hashlib.sha256(part.encode()).hexdigest() for name, part in kernel_parts(src)}


def test_kernel_sources_match_recorded_digests():
    require_cuda_toolkit(cuobjdump=False)
    import tvm

    if not tvm.__version__.startswith("0.27.0"):
        pytest.fail(f"digests recorded with TVM 0.27.0, running {tvm.__version__}: re-record them (module docstring)")
    got = kernel_digests()
    assert sorted(got) == sorted(RECORDED)
    changed = [n for n in RECORDED if got[n] != RECORDED[n]]
    assert not changed, f"generated CUDA changed for {changed}"


if __name__ == "__main__":
    for name, digest in sorted(kernel_digests().items()):
        print(f'    "{name}": "{digest}",')
