"""ROCm AOT build on a machine with no AMD GPU: small TIR kernels -> one library per gfx arch, checked by reading
the embedded code object (ELF header, symbols, LLVM's msgpack kernel metadata), not by our own build code.

Needs Debian's rocm-device-libs and lld-19 (installed by .ci/run); skipped with the reason otherwise.
No AMD GPU exists here: nothing is run on one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from required import missing, missing_rocm_tool

from vptq_mlc.compile import rocm  # noqa: E402
from vptq_mlc.compile.hsaco import find_code_objects, inspect_library  # noqa: E402
from vptq_mlc.errors import CompileError

ARCHS = ("gfx90a", "gfx942", "gfx1100")


def _toolchain_or_skip() -> None:
    try:
        rocm.find_bitcode_dir()
        rocm.find_ld_lld()
    except CompileError as e:
        missing_rocm_tool(f"ROCm build toolchain missing: {e}")


def _kernels():
    from tvm.script import tirx as T

    @T.prim_func
    def vadd(a: T.handle, b: T.handle, c: T.handle):
        n = T.int32()
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        C = T.match_buffer(c, (n,), "float32")
        for i0 in T.thread_binding((n + 63) // 64, "blockIdx.x"):
            for i1 in T.thread_binding(64, "threadIdx.x"):
                if i0 * 64 + i1 < n:
                    # exp pulls ocml from the device libraries, so the link must resolve it (--no-undefined)
                    C[i0 * 64 + i1] = A[i0 * 64 + i1] + T.exp(B[i0 * 64 + i1])

    @T.prim_func(s_tir=True)
    def matmul(A: T.Buffer((128, 256), "float16"), B: T.Buffer((256, 64), "float16"),
               C: T.Buffer((128, 64), "float32")):
        for i, j, k in T.grid(128, 64, 256):
            with T.sblock("C"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    C[vi, vj] = T.float32(0)
                C[vi, vj] = C[vi, vj] + T.Cast("float32", A[vi, vk]) * T.Cast("float32", B[vk, vj])

    @T.prim_func(s_tir=True)
    def gemv(x: T.Buffer((1, 512), "float32"), W: T.Buffer((96, 512), "float32"), y: T.Buffer((1, 96), "float32")):
        for b, o, i in T.grid(1, 96, 512):
            with T.sblock("y"):
                vb, vo, vi = T.axis.remap("SSR", [b, o, i])
                with T.init():
                    y[vb, vo] = T.float32(0)
                y[vb, vo] = y[vb, vo] + x[vb, vi] * W[vo, vi]

    @T.prim_func
    def mixed(a: T.handle, b: T.handle, alpha: T.float32, beta: T.float64, off: T.int64):
        # scalar arguments of every width: the kernarg layout must match LLVM's (checked in test_rocm_runtime)
        n = T.int32()
        m = T.int64()
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (m,), "float64")
        for i0 in T.thread_binding((n + 63) // 64, "blockIdx.x"):
            for i1 in T.thread_binding(64, "threadIdx.x"):
                if i0 * 64 + i1 < n:
                    A[i0 * 64 + i1] = A[i0 * 64 + i1] * alpha + T.Cast(
                        "float32", B[T.Cast("int64", i0 * 64 + i1) + off] * beta) + T.Cast("float32", m)

    return vadd, matmul, gemv, mixed


def build_rocm_kernels(arch: str, out: Path, code_object_version: int = 5) -> Path:
    """vadd, a mixed-scalar kernel and dlight-scheduled matmul + GEMV for one arch, exported to `out`
    (the runtime tests load it too)."""
    tvm = rocm.prepare_rocm_build(code_object_version)
    from tvm.s_tir import dlight as dl

    vadd, matmul, gemv, mixed = _kernels()
    target = rocm.rocm_target(arch)
    mod = tvm.IRModule({"matmul": matmul, "gemv": gemv})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.Fallback())(mod)
    mod["vadd"] = vadd  # bound by hand already
    mod["mixed"] = mixed
    tvm.compile(mod, target=target).export_library(str(out))
    return out


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> dict[str, Path]:
    _toolchain_or_skip()
    d = tmp_path_factory.mktemp("rocm_libs")
    return {a: build_rocm_kernels(a, d / f"kernels_{a}.so") for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_library_holds_one_code_object_for_its_arch(libs, arch):
    cos = inspect_library(libs[arch])
    assert len(cos) == 1, "TVM embeds one HSACO per ROCm library"
    co = cos[0]
    assert co.arch == arch and co.target.endswith(arch)  # amdhsa.target metadata
    assert co.mach_arch == arch  # EF_AMDGPU_MACH in e_flags agrees
    assert co.code_object_version == 5 and co.abi_version == 3  # ELFABIVERSION_AMDGPU_HSA_V5
    assert set(co.kernels) == {"vadd_kernel", "matmul_kernel", "gemv_kernel", "mixed_kernel"}
    for k in co.kernels:
        assert k in co.symbols and f"{k}.kd" in co.symbols  # code + kernel descriptor
    wave = 64 if arch.startswith("gfx9") else 32
    for meta in co.kernels.values():
        assert meta[".wavefront_size"] == wave
        assert meta[".max_flat_workgroup_size"] == 256  # what rocm_target's max_threads_per_block promises
        assert meta[".group_segment_fixed_size"] <= 65536


def test_readelf_agrees(libs, tmp_path):
    """binutils' readelf on the carved code object: AMD HSA OS/ABI, ABI version 3 (v5), AMDGPU machine."""
    if subprocess.run(["which", "readelf"], capture_output=True).returncode != 0:
        missing("readelf (binutils) not installed; apt-get install binutils")
    elf = find_code_objects(libs["gfx90a"].read_bytes())[0]
    p = tmp_path / "k.hsaco"
    p.write_bytes(elf)
    hdr = subprocess.run(["readelf", "-h", str(p)], capture_output=True, text=True, check=True).stdout
    assert "AMD HSA" in hdr and "ABI Version:                       3" in hdr and "AMD GPU" in hdr
    assert "gfx90a" in hdr  # binutils 2.40 names gfx90a (not gfx942/gfx1100)
    syms = subprocess.run(["readelf", "-sW", str(p)], capture_output=True, text=True, check=True).stdout
    assert "vadd_kernel.kd" in syms and "matmul_kernel.kd" in syms


def test_code_object_v6_on_request(tmp_path):
    """v6 (LLVM 22's default) stays available for ROCm >= 6.2 hosts; the default is then restored."""
    _toolchain_or_skip()
    try:
        out = build_rocm_kernels("gfx942", tmp_path / "v6.so", code_object_version=6)
    finally:
        rocm.prepare_rocm_build()
    (co,) = inspect_library(out)
    assert co.code_object_version == 6 and co.abi_version == 4 and co.arch == "gfx942"


def test_rocm_target_limits():
    t90a, t1100 = rocm.rocm_target("gfx90a"), rocm.rocm_target("gfx1100")
    assert t90a.kind.name == "rocm" and str(t90a.attrs["mcpu"]) == "gfx90a"
    assert str(t90a.attrs["mtriple"]) == "amdgcn-amd-amdhsa-hcc"
    assert int(t90a.attrs["thread_warp_size"]) == 64 and int(t1100.attrs["thread_warp_size"]) == 32
    assert int(t90a.attrs["max_threads_per_block"]) == 256


def test_bad_arch_and_version_are_clear_errors():
    with pytest.raises(CompileError, match="bad ROCm arch"):
        rocm.rocm_target("sm_90")
    with pytest.raises(CompileError, match="code object v4"):
        rocm.prepare_rocm_build(4)


def test_min_rocm():
    assert rocm.min_rocm("gfx90a") == "ROCm 5.2"
    assert rocm.min_rocm("gfx942") == "ROCm 5.7"
    assert rocm.min_rocm("gfx1100", 6) == "ROCm 6.2"


def test_build_target_for_compile_command():
    from vptq_mlc.compile.targets import resolve_backend

    (bt,) = resolve_backend("rocm", "GFX1100")
    assert bt.label == "rocm-gfx1100" and bt.archs == ("gfx1100",) and bt.kind == "rocm"
