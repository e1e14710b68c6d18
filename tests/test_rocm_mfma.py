"""ROCm MFMA GEMM (tir_kernels/rocm_dense_mfma.py, opt-in with VPTQ_MLC_ROCM_MFMA=1) without AMD hardware.

What is checked here:
- the instruction: the intrinsic our kernel calls is the one behind TVM's `rocm_mfma_f16f16f32` tensor intrinsic,
  and that intrinsic's description (plain TIR, built and run on the CPU) computes D = A B + C over the lane layouts
  the kernel's emulation uses (TVM's index maps);
- the schedule: the kernel's own per-thread TIR (global loads, LDS layout, fragment addresses, clamps, bounds
  checks, output mapping), built for the CPU with each MFMA computed per that description over a wave's 64 lanes,
  gives x @ w.T (numpy, float64) on ragged shapes and at the 7B edges (K = 11008, N = 32000); a deliberately wrong
  lane layout fails it; with the dequantize kernel in front (its CPU build), a VQ layer's prefill matches the
  reference dequantize;
- the build: with the switch on, a tiny model compiles for gfx90a / gfx942 (MFMA in every prefill and dense GEMM
  kernel, no spills or scratch, LDS within 64 KB) and gfx1100 keeps its SIMT kernels; off, nothing changes.

Not checked (no AMD GPU): that the hardware executes what TVM's description says (AMD's matrix instruction
calculator agrees for CDNA2/CDNA3: docs/rocm.md), barrier placement and LDS races (the emulation runs the phases
between barriers one after another), LLVM's AMDGPU code generation, speed. ~40 s on 2 cores (most of it the model
build for two archs).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_rocm_compile import _toolchain_or_skip

from vptq_mlc.tir_kernels import rocm_dense_mfma as rm


def _run_cpu(func, *arrays):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return tensors


def _tvm_rocm_intrinsics():
    """TVM's `tensor_intrin/rocm.py` without the package's other modules (its `__init__` also registers every CUDA
    intrinsic: ~20 s). The module stays registered, so a later import of the whole package reuses it."""
    import importlib
    import sys
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name + ".rocm" in sys.modules:
        return sys.modules[name + ".rocm"]
    if name in sys.modules:
        return importlib.import_module(name + ".rocm")
    stub = types.ModuleType(name)
    stub.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = stub
    try:
        return importlib.import_module(name + ".rocm")
    finally:
        del sys.modules[name]


def test_emulation_follows_tvms_mfma_intrinsic():
    """The link to TVM's definition of the instruction (its `rocm_mfma_f16f16f32` tensor intrinsic):
    - our lane maps are TVM's index maps, entry for entry, and each pair is inverse (every tile entry in exactly
      one lane register);
    - the intrinsic's description (plain TIR, built and run on the CPU) computes D = A B + C over those maps;
    - our kernel calls the LLVM intrinsic of TVM's implementation, with the same operand order (A fragment,
      B fragment, accumulator, cbsz = abid = blgp = 0)."""
    from tvm import tirx
    from tvm.s_tir import TensorIntrin

    tvm_rocm_intrin = _tvm_rocm_intrinsics()
    ours = ((rm.A_OF_LANE, rm.LANE_OF_A, "A"), (rm.B_OF_LANE, rm.LANE_OF_B, "B"), (rm.D_OF_LANE, rm.LANE_OF_D, "C"))
    for of_lane, lane_of, name in ours:
        tvm_of_lane = getattr(tvm_rocm_intrin, f"thread_id_shared_access_64x4_to_16x16_layout_{name}")
        tvm_lane_of = getattr(tvm_rocm_intrin, f"shared_16x16_to_local_64x4_layout_{name}")
        seen = set()
        for lane in range(64):
            for e in range(4):
                r, c = of_lane(lane, e)
                assert (r, c) == tuple(int(v) for v in tvm_of_lane(lane, e)), (name, lane, e)
                assert lane_of(r, c) == (lane, e) == tuple(int(v) for v in tvm_lane_of(r, c)), (name, r, c)
                seen.add((r, c))
        assert seen == {(r, c) for r in range(16) for c in range(16)}

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((64, 4)).astype(np.float16), rng.standard_normal((64, 4)).astype(np.float16)
    c = rng.standard_normal((64, 4)).astype(np.float32)
    intrin = TensorIntrin.get(tvm_rocm_intrin.ROCM_MFMA_f16f16f32_INTRIN)
    got = _run_cpu(intrin.desc, a, b, c.copy())[2].numpy()
    ta, tb, tc = np.empty((16, 16)), np.empty((16, 16)), np.empty((16, 16))
    for lane in range(64):
        for e in range(4):
            ta[rm.A_OF_LANE(lane, e)], tb[rm.B_OF_LANE(lane, e)] = a[lane, e], b[lane, e]
            tc[rm.D_OF_LANE(lane, e)] = c[lane, e]
    d = ta @ tb + tc
    want = np.array([[d[rm.D_OF_LANE(lane, e)] for e in range(4)] for lane in range(64)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    call = re.compile(r'T\.call_llvm_pure_intrin\("float32x4", "([\w.]+)", (\w+)\[[^]]*\], (\w+)\[[^]]*\], '
                      r'(\w+)\[[^]]*\], 0, 0, 0\)')
    assert call.findall(intrin.impl.script()) == [(rm.MFMA_INTRIN, "A", "B", "C")]
    kernel = rm.dense_mfma_rocm((tirx.Var("n", "int64"),), 256, 64).script()
    assert set(call.findall(kernel)) == {(rm.MFMA_INTRIN, "fa", "fb", "acc")}


def _emulated_gemm(lead, n, k, plan=None):
    return rm.dense_mfma_rocm(lead, n, k, plan=plan, emulate=True)


def _check_rows(y: np.ndarray, ref: np.ndarray, tol: float = 2e-3) -> None:
    """Every row of y (fp16 output) within fp16 rounding of the float64 reference; no NaN (a read of LDS the loads
    never wrote)."""
    assert not np.isnan(y).any()
    err = np.linalg.norm(y.astype(np.float64) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < tol, (err.max(), int(err.argmax()))


# plan, rows, N, K: partial row and column tiles, an odd number of K steps, the 7B edges (K = 11008, N = 32000);
# None: the symbolic-row kernel with every plan, the row count picking one at run time
GEMM_CASES = {
    "prefill-ragged": ("PREFILL_PLAN", 131, 136, 96),
    "small-ragged": ("SMALL_PLAN", 67, 72, 64),
    "decode-n32000": ("DECODE_PLAN", 5, 32000, 64),
    "small-k11008": ("SMALL_PLAN", 20, 72, 11008),
    "symbolic-3": (None, 3, 200, 64),
    "symbolic-40": (None, 40, 200, 64),
    "symbolic-300": (None, 300, 16512, 32),  # 129 column tiles: the 128 x 128 plan
}


@pytest.mark.parametrize("name", sorted(GEMM_CASES))
def test_schedule_computes_x_wt_on_cpu(name):
    from tvm import tirx

    plan, m, n, k = GEMM_CASES[name]
    if plan is None:
        func = _emulated_gemm((tirx.Var("seq_len", "int64"), 1), n, k)
        lead = (m, 1)
    else:
        func = _emulated_gemm((m,), n, k, getattr(rm, plan))
        lead = (m,)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    w = rng.standard_normal((n, k)).astype(np.float16)
    y = _run_cpu(func, x, w, np.full((*lead, n), np.nan, np.float16))[2].numpy().reshape(m, n)
    _check_rows(y, x.reshape(m, k).astype(np.float64) @ w.astype(np.float64).T)


def test_symbolic_plans_cover_every_row_count():
    plans = rm.symbolic_plans(200)
    assert plans[0] == (rm.DECODE_MAX_ROWS, rm.DECODE_PLAN) and plans[-1] == (None, rm.PREFILL_PLAN)
    assert [p for _, p in rm.symbolic_plans(16512)] == [rm.DECODE_PLAN, rm.PREFILL_PLAN]
    for plan in (rm.DECODE_PLAN, rm.SMALL_PLAN, rm.PREFILL_PLAN):
        assert plan.threads == 256 and plan.lds_bytes() <= rm.LDS_BYTES
    for k in (4096, 11008, 14336):
        assert rm.mfma_supported(32000, k, "float16")
    assert not rm.mfma_supported(4096, 4100, "float16") and not rm.mfma_supported(4096, 4096, "float32")


def test_a_wrong_lane_layout_fails_the_emulation(monkeypatch):
    """The check has teeth: with lanes 16-31 and 32-47 of the A fragment swapped (a plausible layout slip), the
    emulated kernel no longer computes x @ w.T."""
    good = rm.A_OF_LANE

    def swapped(lane, e):
        from tvm import tirx

        return good(tirx.Select(lane // 16 == 1, lane + 16, tirx.Select(lane // 16 == 2, lane - 16, lane)), e)

    monkeypatch.setattr(rm, "A_OF_LANE", swapped)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 64)).astype(np.float16)
    w = rng.standard_normal((72, 64)).astype(np.float16)
    y = _run_cpu(_emulated_gemm((20,), 72, 64, rm.SMALL_PLAN), x, w, np.zeros((20, 72), np.float16))[2].numpy()
    with pytest.raises(AssertionError):
        _check_rows(y, x.astype(np.float64) @ w.astype(np.float64).T)


def test_vq_prefill_by_dequantize_then_mfma_gemm_on_cpu():
    """ROCm's VQ prefill under the switch: the dequantize kernel (CPU build of its per-thread code) writes the
    scratch weight, the MFMA GEMM (emulated) multiplies it; against the reference dequantize (outlier columns,
    residual codebook)."""
    from tvm import tirx

    from vptq_mlc.artifact.vq_layout import generic_layout, vq_operand_shapes
    from vptq_mlc.checkpoint.dequant import decode_codes, dequantize
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.testing.synthetic import random_layer
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_dequantize_func

    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 256, 136, enable_norm=False, outlier_size=64,
                                       outlier_vector_len=4, num_outlier_centroids=256)
    tensors = random_layer(cfg, np.random.default_rng(7), "float16")
    codes = decode_codes(cfg, tensors)
    ops = generic_layout(cfg, tensors, codes, "float16")
    w = _run_cpu(vq_dequantize_func(cfg, "float16", cuda=False), *(ops[n] for n in vq_operand_shapes(cfg)),
                 np.full((136, 256), np.nan, np.float16))[-1].numpy()
    xs = np.random.default_rng(3).standard_normal((37, 256)).astype(np.float16)
    y = _run_cpu(_emulated_gemm((tirx.Var("n", "int64"),), 136, 256), xs, w, np.zeros((37, 136), np.float16))
    ref_w = dequantize(cfg, tensors)
    if codes.perm is not None:
        ref_w = ref_w[:, codes.perm]
    _check_rows(y[2].numpy(), xs.astype(np.float64) @ ref_w.astype(np.float64).T)


def test_switch_and_arch_gate(monkeypatch):
    from vptq_mlc.compile.rocm import RocmBackend
    from vptq_mlc.errors import CompileError
    from vptq_mlc.tir_kernels.registry import ROCM_MFMA_ENV

    monkeypatch.delenv(ROCM_MFMA_ENV, raising=False)
    assert not RocmBackend("gfx90a").mfma  # default off
    off = [p.info.name for p in RocmBackend("gfx90a").passes()]
    monkeypatch.setenv(ROCM_MFMA_ENV, "1")
    assert RocmBackend("gfx90a").mfma and RocmBackend("gfx942").mfma
    assert not RocmBackend("gfx1100").mfma  # RDNA3: WMMA, no TVM intrinsic; SIMT kernels
    on = [p.info.name for p in RocmBackend("gfx90a").passes()]
    assert [p for p in on if p not in off] == ["FuseTransposeMatmul", "VPTQDenseMFMA"]
    assert [p.info.name for p in RocmBackend("gfx1100").passes()] == off
    monkeypatch.setenv(ROCM_MFMA_ENV, "yes")
    with pytest.raises(CompileError, match="VPTQ_MLC_ROCM_MFMA='yes'"):
        _ = RocmBackend("gfx90a").mfma


def kernel_assembly(asm: str, names) -> dict[str, str]:
    """Kernel name -> its text in LLVM's AMDGPU assembly (from its label to the next kernel's)."""
    starts = sorted((m.start(), m.group(1)) for m in re.finditer(r"^(\w+):\s*$", asm, flags=re.M)
                    if m.group(1) in names)
    return {name: asm[s:e] for (s, name), (e, _) in zip(starts, starts[1:] + [(len(asm), "")])}


def build_with_assembly(model: Path, out: Path, archs: str, monkeypatch) -> dict[str, tuple[Path, str]]:
    """compile_model for `archs` (static batch 2 only), keeping each library's AMDGPU assembly as LLVM wrote it
    (TVM's ROCm module holds it until export): arch -> (library, assembly)."""
    from tvm import relax

    from vptq_mlc.compile.build import compile_model

    asm: dict[str, str] = {}
    build = relax.build

    def keep_assembly(mod, target, *args, **kwargs):
        ex = build(mod, target, *args, **kwargs)
        stack = [ex.mod]
        while stack:
            m = stack.pop()
            if m.kind in ("hsaco", "rocm", "hip"):
                asm[str(target.attrs["mcpu"])] = m.inspect_source("asm")
            stack += list(m.imports)
        return ex

    monkeypatch.setattr(relax, "build", keep_assembly)
    out.mkdir(parents=True, exist_ok=True)  # a folder: one library per arch in it
    libs = compile_model(model, "rocm", out, arch=archs, static_batches=(2,))
    archs_of = {lib: lib.name.rsplit("-", 1)[-1].removesuffix(".so") for lib in libs}
    return {arch: (lib, asm[arch]) for lib, arch in archs_of.items()}


@pytest.fixture(scope="module")
def mfma_build(tmp_path_factory):
    _toolchain_or_skip()
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint
    from vptq_mlc.tir_kernels.registry import ROCM_MFMA_ENV

    d = tmp_path_factory.mktemp("rocm_mfma")
    ckpt = make_synthetic_checkpoint(d / "ckpt", variant="v8-k256-256", hidden_size=64, intermediate_size=128,
                                     num_layers=1, vocab_size=320,
                                     layer_kwargs={"outlier_size": 16, "outlier_vector_len": 4,
                                                   "num_outlier_centroids": 64})
    model = convert_checkpoint(ckpt, d / "mlc", dtype="float16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ROCM_MFMA_ENV, "1")
        return model, build_with_assembly(model, d / "libs", "gfx90a", mp)


def test_mfma_build_runs_prefill_and_dense_matmuls_on_matrix_cores(mfma_build):
    arch = "gfx90a"
    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.compile.hsaco import inspect_library

    model, built = mfma_build
    lib, asm = built[arch]
    (co,) = inspect_library(lib)
    assert co.arch == arch
    layers = set(ChatConfig.load(model).vptq_layers().values())
    code = kernel_assembly(asm, co.kernels)
    assert set(code) == set(co.kernels)
    # symbolic rows of each distinct VQ layer: the dequantize kernel (7 operands) + 3 GEMM plans (x, w, y, rows)
    gemms = {k for k, m in co.kernels.items() if k.startswith("vq_matmul")
             and [a[".value_kind"] for a in m[".args"]].count("global_buffer") == 3}
    assert len(gemms) == 3 * len(layers), sorted(gemms)
    dense = {k for k in co.kernels if "_dense_mfma_kernel" in k}  # the model's dense fp16 linears (lm_head)
    assert dense and len(dense) % 3 == 0, sorted(dense)
    for name in gemms | dense:
        meta = co.kernels[name]
        assert "v_mfma_f32_16x16x16" in code[name], name  # gfx942 spells it v_mfma_f32_16x16x16_f16
        assert meta[".vgpr_spill_count"] == 0 and meta[".sgpr_spill_count"] == 0, name
        assert meta[".private_segment_fixed_size"] == 0, name  # no scratch memory
        assert 0 < meta[".group_segment_fixed_size"] <= 65536 and meta[".wavefront_size"] == 64, name
        assert "global_load_dwordx4" in code[name] and "ds_write_b128" in code[name], name
    others = [k for k in co.kernels if k not in gemms | dense]
    assert not any("v_mfma" in code[k] for k in others)


def test_gfx942_kernels_use_matrix_cores(tmp_path):
    """gfx942 (MI300; the whole model is built for gfx90a above, for gfx942 by hand, docs/rocm.md): the dense GEMM
    of a symbolic row count and a VQ layer's dequantize + GEMM prefill, in LLVM's assembly."""
    _toolchain_or_skip()
    import tvm
    from tvm import tirx

    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.compile import rocm
    from vptq_mlc.compile.hsaco import inspect_library
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_prefill_cuda

    rocm.prepare_rocm_build()
    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 256, 128)
    funcs = {"dense": rm.dense_mfma_rocm((1, tirx.Var("seq_len", "int64")), 320, 64),
             "prefill": vq_prefill_cuda(cfg, "float16", from_rows=0, gemms=rm.vq_gemm_macros)[0]}
    ex = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}),
                     target=rocm.rocm_target("gfx942"))
    (dev,) = ex.mod.imports
    code = kernel_assembly(dev.inspect_source("asm"), {f"{n}_kernel{s}" for n in funcs for s in ("", "_1", "_2",
                                                                                                "_3")})
    gemms = {"dense_kernel", "dense_kernel_1", "dense_kernel_2", "prefill_kernel_1", "prefill_kernel_2",
             "prefill_kernel_3"}
    assert set(code) == gemms | {"prefill_kernel"}  # + the dequantize kernel
    assert all("v_mfma_f32_16x16x16_f16" in code[k] for k in gemms) and "v_mfma" not in code["prefill_kernel"]
    ex.export_library(str(tmp_path / "gfx942.so"))
    (co,) = inspect_library(tmp_path / "gfx942.so")
    assert co.arch == "gfx942"
    for k in gemms:
        meta = co.kernels[k]
        assert meta[".vgpr_spill_count"] == 0 and meta[".private_segment_fixed_size"] == 0, k
        assert 0 < meta[".group_segment_fixed_size"] <= 65536, k


def test_default_rocm_build_has_no_mfma(monkeypatch):
    """Switch off: the ROCm selector and pipeline are the SIMT ones (the library itself: tests/test_rocm_model.py,
    which also checks that its kernel names hold no MFMA GEMM)."""
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.compile.rocm import RocmBackend
    from vptq_mlc.tir_kernels.registry import ROCM_MFMA_ENV

    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 256, 128)
    monkeypatch.delenv(ROCM_MFMA_ENV, raising=False)
    off = RocmBackend("gfx90a").kernel_selector()(cfg, "float16", None)
    assert off.scratch == () and "T.call_llvm_pure_intrin" not in off.func.script()
    monkeypatch.setenv(ROCM_MFMA_ENV, "1")
    on = RocmBackend("gfx90a").kernel_selector()(cfg, "float16", None)
    assert on.scratch == (((128, 256), "float16"),) and "llvm.amdgcn.mfma" in on.func.script()
    assert RocmBackend("gfx1100").kernel_selector()(cfg, "float16", None).scratch == ()
    assert RocmBackend("gfx90a").kernel_selector()(cfg, "float32", None).scratch == ()  # fp32: dlight


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
