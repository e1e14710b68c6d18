"""The wgmma dense GEMM (vptq_mlc/tir_kernels/cuda_wgmma.py, sm_90a): the compile switch `VPTQ_MLC_WGMMA` (off by
default; on, a CUDA build must be for sm_90 alone and becomes sm_90a code), that the kernel compiles to sm_90a SASS
with nvcc, that the pipeline's GEMMs take it only when the switch is on, and its results on the CPU: the generated
CUDA run with C++ models of the PTX instructions (tests/wgmma_emulator.py) against numpy. No GPU here: on an H100,
bench/wgmma_gemm.py checks every output row against an fp32 reference. ~30 s on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from cuda_sources import generated_cuda, kernel_definitions
from test_cuda_aot import require_cuda_toolkit

from vptq_mlc.errors import CompileError

WGMMA_LINE = "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16"  # the PTX, in TVM's helper function
WGMMA_CALL = "ptx_wgmma_f16_ss_mma_async_sync_aligned_m64n"  # the helper's call in a kernel (any tile width)


def test_switch_is_auto_by_default_and_refuses_bad_values(monkeypatch):
    from vptq_mlc.tir_kernels.cuda_wgmma import WGMMA_ENV, wgmma_setting

    monkeypatch.delenv(WGMMA_ENV, raising=False)
    assert wgmma_setting() is None
    monkeypatch.setenv(WGMMA_ENV, "1")
    assert wgmma_setting() is True
    monkeypatch.setenv(WGMMA_ENV, "0")
    assert wgmma_setting() is False
    monkeypatch.setenv(WGMMA_ENV, "yes")
    with pytest.raises(CompileError, match=f"{WGMMA_ENV}='yes'"):
        wgmma_setting()


def test_sm90_only_builds_take_wgmma_unless_switched_off(monkeypatch):
    """Unset: a build for sm_90 alone is sm_90a code with the wgmma GEMMs, any other arch list is unchanged; 1: the
    same, and other arch lists are refused; 0: never."""
    from vptq_mlc.compile.cuda import CudaBackend
    from vptq_mlc.tir_kernels.cuda_wgmma import WGMMA_ENV, wgmma_for_target

    monkeypatch.delenv(WGMMA_ENV, raising=False)
    (auto,) = CudaBackend.resolve("sm_90")
    assert auto.archs == ("sm_90a",) and wgmma_for_target(auto.target)
    for archs in (None, "sm_80,sm_90", "sm_89"):
        (other,) = CudaBackend.resolve(archs)
        assert "sm_90a" not in other.archs and not wgmma_for_target(other.target)
    assert CudaBackend.resolve(None)[0].archs == ("sm_80", "sm_86", "sm_89", "sm_90")

    monkeypatch.setenv(WGMMA_ENV, "0")
    (off,) = CudaBackend.resolve("sm_90")
    assert off.archs == ("sm_90",) and not wgmma_for_target(off.target)
    (plain_90a,) = CudaBackend.resolve("sm_90a")  # sm_90a switched off: no wgmma either
    assert not wgmma_for_target(plain_90a.target)

    monkeypatch.setenv(WGMMA_ENV, "1")
    (on,) = CudaBackend.resolve("sm_90")
    assert on.archs == ("sm_90a",) and str(on.target.attrs["arch"]) == "sm_90a" and wgmma_for_target(on.target)
    for archs in (None, "sm_80,sm_90", "sm_89"):  # sm_90a SASS would not load on the others
        with pytest.raises(CompileError, match="--arch sm_90"):
            CudaBackend.resolve(archs)


def test_plans_fit_shared_memory():
    from vptq_mlc.tir_kernels.cuda_wgmma import PREFILL_WGMMA_PLAN, SM90_MAX_DYN_SMEM, WgmmaPlan, check_plan

    assert PREFILL_WGMMA_PLAN.smem_bytes() <= SM90_MAX_DYN_SMEM
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (32000, 4096)):
        check_plan(PREFILL_WGMMA_PLAN, n, k)
    with pytest.raises(ValueError, match="K % 64"):
        check_plan(PREFILL_WGMMA_PLAN, 4096, 4064)
    with pytest.raises(ValueError, match="shared memory"):
        check_plan(WgmmaPlan(2, 256, 5), 4096, 4096)


def test_kernel_compiles_to_sm90a_sass():
    """nvcc assembles the kernel for sm_90a (the one arch wgmma exists on): the library holds only sm_90a code."""
    require_cuda_toolkit()
    import tvm
    from tvm import tirx

    from vptq_mlc.compile.cuda import CudaBackend
    from vptq_mlc.compile.fatbin import inspect_library
    from vptq_mlc.tir_kernels.cuda_wgmma import dense_wgmma_cuda

    (bt,) = CudaBackend.resolve("sm_90a")
    bt.prepare()
    f = dense_wgmma_cuda((1, tirx.Var("seq_len", "int64")), 4096, 4096).with_attr("global_symbol", "wg")
    lib = tvm.compile(tvm.IRModule({"wg": f}), target=bt.target)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "wg.so"
        lib.export_library(str(path))
        rep = inspect_library(path)
    assert rep.archs == ["sm_90a"] and rep.kernels == 1 and not rep.ptx, rep


def test_pipeline_gemms_take_wgmma_only_with_the_switch(monkeypatch):
    """The symbolic-row dense GEMM and the VQ prefill's dequantize + GEMM: with the switch on (sm_90a) prompts from
    WGMMA_FROM_ROWS rows take the wgmma kernels (the short-prompt plan, then the long-prompt one) and the decode /
    shorter plans stay mma.sync; off, no wgmma anywhere."""
    require_cuda_toolkit(cuobjdump=False)
    import tvm
    from tvm import tirx

    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.tir_kernels.cuda_dense_mma import dense_mma_cuda
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_prefill_cuda
    from vptq_mlc.tir_kernels.cuda_wgmma import WGMMA_ENV, wgmma_for_target

    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 512, 1024)
    for on in (False, True):
        monkeypatch.setenv(WGMMA_ENV, "1" if on else "0")

        def build(bt):
            wg = wgmma_for_target(bt.target)
            assert wg is on
            funcs = {"dense": dense_mma_cuda((1, tirx.Var("seq_len", "int64")), 4096, 4096, wgmma=wg),
                     "vq": vq_prefill_cuda(cfg, "float16", wgmma=wg)[0]}
            mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
            return tvm.compile(mod, target=bt.target)

        src = generated_cuda(build, "sm_90")
        kernels = kernel_definitions(src)
        wgmma = sorted(n for n, code in kernels.items() if WGMMA_CALL in code)
        if not on:
            assert wgmma == [] and "wgmma" not in src, wgmma
            continue
        # dense: decode, 64 x 64 tiles (up to 255 rows), wgmma (128- then 256-column tiles); vq: VQ MMA (decode,
        # prefill plans), dequantize, 64 x 64 tiles (up to 255 rows), wgmma (both plans)
        assert wgmma == ["dense_kernel_2", "dense_kernel_3", "vq_kernel_4", "vq_kernel_5"], sorted(kernels)
        for name in wgmma:
            code = kernels[name]
            assert "mma.sync" not in code and "ptx_fence_proxy_proxy_async_shared__cta" in code, name
        assert WGMMA_LINE in src
        assert all("mma.sync.aligned.m16n8k16" in kernels[n] for n in ("dense_kernel", "dense_kernel_1"))


def test_kernel_computes_x_wt_on_the_cpu(tmp_path):
    """Every launch variant (two or one consumer warpgroups, 256 or 128 columns, with the producer warpgroup and its
    mbarriers, grouped rasterization) on a shape with partial row and column tiles (rows and weight rows clamped)
    and 8 K steps (the ring wraps twice): every output row within fp16 rounding of the fp32-accumulate product."""
    import tvm
    from wgmma_emulator import WgmmaEmulator

    from vptq_mlc.tir_kernels.cuda_wgmma import WgmmaPlan, dense_wgmma_cuda

    m, n, k = 200, 384, 512
    plans = {"wg2_n256": WgmmaPlan(2, 256, 4), "wg1_n256": WgmmaPlan(1, 256, 5), "wg2_n128": WgmmaPlan(2, 128, 6),
             "ws_wg2_n256": WgmmaPlan(2, 256, 4, True),
             # grouped rasterization, the last group short: 4 row tiles in groups of 3; 2 row tiles in one group of 2
             "wg1_n256_g3": WgmmaPlan(1, 256, 5, group_m=3), "ws_wg2_n128_g2": WgmmaPlan(2, 128, 6, True, 2)}
    funcs = {name: dense_wgmma_cuda((m,), n, k, plan=p).with_attr("global_symbol", name) for name, p in plans.items()}
    kernels = kernel_definitions(generated_cuda(lambda bt: tvm.compile(tvm.IRModule(funcs), target=bt.target),
                                                "sm_90a"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = (rng.standard_normal((n, k)) / k ** 0.5).astype(np.float16)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    for name, p in plans.items():
        y = np.full((m, n), np.nan, np.float16)
        grid = (-(-n // p.block_n), -(-m // p.block_m))
        WgmmaEmulator(kernels[f"{name}_kernel"], tmp_path)(
            x, w, y, (grid[0] * grid[1], 1) if p.group_m else grid, p.threads)
        row_err = np.linalg.norm(y.astype(np.float64) - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert not np.isnan(y).any() and row_err.max() < 5e-4, (name, row_err.max())


def test_bias_epilogue_adds_the_bias_before_rounding_on_the_cpu(tmp_path):
    """The epilogue the folded prefill and biased linears use: y = round(x w^T + bias), the bias added to the fp32 sum
    (grouped 128-column plan, partial tiles); a kernel that left the bias out would be off by the bias itself."""
    import tvm
    from tvm.script import tirx as T
    from wgmma_emulator import WgmmaEmulator

    from vptq_mlc.tir_kernels.cuda_common import KERNEL_ATTRS
    from vptq_mlc.tir_kernels.cuda_wgmma import SHORT_PREFILL_WGMMA_PLAN as plan
    from vptq_mlc.tir_kernels.cuda_wgmma import wgmma_gemm_macro

    m, n, k = 200, 384, 512
    gemm = wgmma_gemm_macro(m, n, k, m, plan, add_bias=True)

    @T.prim_func(private=True)
    def biased(x: T.Buffer((m, k), "float16"), w: T.Buffer((n, k), "float16"), bias: T.Buffer((n,), "float16"),
               y: T.Buffer((m, n), "float16")):
        T.func_attr(KERNEL_ATTRS)
        xf = T.decl_buffer((m * k,), "float16", data=x.data)
        yf = T.decl_buffer((m * n,), "float16", data=y.data)
        gemm(xf, w, yf, bias)

    mod = tvm.IRModule({"biased": biased.with_attr("global_symbol", "biased")})
    (source,) = kernel_definitions(generated_cuda(lambda bt: tvm.compile(mod, target=bt.target), "sm_90a")).values()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = (rng.standard_normal((n, k)) / k ** 0.5).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float16)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + bias.astype(np.float64)
    y = np.full((m, n), np.nan, np.float16)
    grid = -(-n // plan.block_n) * -(-m // plan.block_m)
    WgmmaEmulator(source, tmp_path)(x, w, y, (grid, 1), plan.threads, bias=bias)
    row_err = np.linalg.norm(y.astype(np.float64) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert not np.isnan(y).any() and row_err.max() < 5e-4, row_err.max()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
