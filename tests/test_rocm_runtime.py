"""Our ROCm runtime module (vptq_mlc/rocm_runtime): builds with g++ against the wheels' headers and Debian's HIP,
loads on this machine (no AMD GPU), registers TVM's ROCm device API and `hip` module loader, and accepts a ROCm
library built by TVM up to the point where a GPU is needed, which then fails with our "no ROCm device" error.

The loader's view of each kernel (names, argument layout) is compared with the code object's own metadata, which
LLVM wrote (the kernarg offsets the GPU will read). No AMD GPU exists here: launches are never executed.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from required import missing_rocm_tool

from vptq_mlc.compile.hsaco import inspect_library  # noqa: E402
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.rocm_runtime import build  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime_lib(tmp_path_factory) -> Path:
    try:
        build.find_hip()
    except RuntimeLoadError as e:
        missing_rocm_tool(f"HIP headers not installed: {e}")
    # one build per session (shared with test_package.py): the builder skips an up-to-date output
    return build.build_rocm_runtime(tmp_path_factory.getbasetemp() / "rocm_rt" / "libvptq_rocm_runtime.so")


@pytest.fixture(scope="module")
def info(runtime_lib):
    from vptq_mlc.runtime.rocm import load_rocm_runtime

    return load_rocm_runtime(runtime_lib)


@pytest.fixture(scope="module")
def rocm_lib(tmp_path_factory) -> Path:
    from test_rocm_compile import _toolchain_or_skip, build_rocm_kernels

    _toolchain_or_skip()
    return build_rocm_kernels("gfx90a", tmp_path_factory.mktemp("rocm_lib") / "kernels_gfx90a.so")


@pytest.fixture()
def no_gpu(info):
    if info["device_count"] > 0:
        pytest.skip("this host has an AMD GPU; the no-device behaviour cannot be checked")


def test_builds_and_links_against_hip(runtime_lib):
    out = subprocess.run(["readelf", "-d", str(runtime_lib)], capture_output=True, text=True).stdout
    assert "libamdhip64.so" in out and "libtvm_runtime.so" in out and "libtvm_ffi.so" in out


def test_registers_device_api_and_hip_loader(info):
    import tvm_ffi

    for name in ("device_api.rocm", "device_api.rocm_host", "ffi.Module.load_from_bytes.hip",
                 "ffi.Module.load_from_bytes.hsaco"):
        assert name in info["registered"]
        assert tvm_ffi.get_global_func(name, allow_missing=True) is not None
    assert info["skipped"] == []
    assert info["hip_runtime_version"] > 0 and info["hip_header_version"] > 0


def test_device_queries_without_gpu(no_gpu, info):
    import tvm

    assert info["device_count"] == 0 and info["no_device_reason"]
    assert tvm.rocm(0).exist is False  # kExist never throws (TVM asks it on build boxes)
    with pytest.raises(RuntimeError, match="no ROCm device"):
        tvm.runtime.empty((4,), "float32", tvm.rocm(0))


def test_hip_module_accepted_and_matches_code_object(info, rocm_lib):
    import tvm
    import tvm_ffi

    lib = tvm.runtime.load_module(str(rocm_lib))
    (hip,) = [m for m in lib.imports if m.kind == "hip"]
    mine = tvm_ffi.get_global_func("vptq_rocm.module_info")(hip)
    (co,) = inspect_library(rocm_lib)
    assert str(mine["arch"]) == co.arch == "gfx90a"
    assert int(mine["code_object_version"]) == co.code_object_version == 5
    assert set(mine["kernels"].keys()) == set(co.kernels)
    for name, k in mine["kernels"].items():
        meta = co.kernels[str(name)]
        # our kernarg layout == the offsets LLVM compiled the kernel to read
        assert [int(o) for o in k["kernarg_offsets"]] == [a[".offset"] for a in meta[".args"]]
        assert int(k["kernarg_size"]) <= meta[".kernarg_segment_size"]
        assert len(k["arg_types"]) == len(meta[".args"])
        assert all(re.fullmatch(r"(blockIdx|threadIdx)\.[xyz]|tirx\.use_dyn_shared_memory", str(t))
                   for t in k["launch_param_tags"])
    assert lib.implements_function("vadd") and lib.implements_function("matmul")


def test_kernel_launch_needs_a_device(no_gpu, rocm_lib):
    import tvm

    lib = tvm.runtime.load_module(str(rocm_lib))
    (hip,) = [m for m in lib.imports if m.kind == "hip"]
    with pytest.raises(RuntimeError, match="no ROCm device"):
        hip["vadd_kernel"](None, None, None, 4, 1, 64)
    with pytest.raises(TypeError, match="takes 4 arguments and 2 launch values"):
        hip["vadd_kernel"](None, None)


def test_corrupted_blob_is_a_clear_error(info):
    import tvm_ffi

    load = tvm_ffi.get_global_func("ffi.Module.load_from_bytes.hip")
    good_head = (5).to_bytes(8, "little") + b"hsaco" + (1).to_bytes(8, "little")
    with pytest.raises(ValueError, match="corrupted ROCm"):
        load(bytearray(good_head + (999).to_bytes(8, "little") + b"vadd"))
    with pytest.raises(ValueError, match="format 'cuda'"):
        load(bytearray((4).to_bytes(8, "little") + b"cuda"))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=120)


def test_without_our_runtime_tvm_cannot_load_rocm_libraries(rocm_lib):
    """The gap this module fills: the wheel alone has no `hip` loader."""
    res = _run(f"""
        import sys; sys.modules["torch"] = None
        import tvm
        try:
            tvm.runtime.load_module({str(rocm_lib)!r})
        except Exception as e:
            print("ERR", e)
    """)
    assert "ERR" in res.stdout and "not registered" in res.stdout, res.stdout + res.stderr


def test_runtime_only_process(no_gpu, runtime_lib, rocm_lib):
    """A deploy-style process: TVM runtime-only (no compiler), our runtime loaded, library accepted."""
    res = _run(f"""
        import sys; sys.modules["torch"] = None
        from vptq_mlc.runtime.rocm import load_rocm_runtime
        load_rocm_runtime({str(runtime_lib)!r})
        import tvm
        assert tvm.base._RUNTIME_ONLY
        lib = tvm.runtime.load_module({str(rocm_lib)!r})
        hip = [m for m in lib.imports if m.kind == "hip"][0]
        try:
            hip["gemv_kernel"](None, None, None, 1, 1, 1)
        except RuntimeError as e:
            print("ERR", e)
        print("compiler mapped:", "libtvm_compiler" in open("/proc/self/maps").read())
    """, TVM_USE_RUNTIME_LIB="1")
    assert "ERR no ROCm device" in res.stdout, res.stdout + res.stderr
    assert "compiler mapped: False" in res.stdout


def test_missing_library_is_a_clear_error(tmp_path):
    res = _run(f"""
        import sys; sys.modules["torch"] = None
        from vptq_mlc.runtime.rocm import load_rocm_runtime
        from vptq_mlc.errors import RuntimeLoadError
        try:
            load_rocm_runtime({str(tmp_path / "nope.so")!r})
        except RuntimeLoadError as e:
            print("ERR", e)
    """)
    assert "ERR ROCm runtime not built" in res.stdout and "vptq_mlc.rocm_runtime.build" in res.stdout, res.stderr


# ---- the host-side flow on a pretend GPU (tests/fake_hip: a test double for libamdhip64) ----

FAKE_HIP_SRC = Path(__file__).parent / "fake_hip" / "fake_hip.cc"


@pytest.fixture(scope="module")
def fake_hip_dir(runtime_lib, tmp_path_factory) -> Path:
    """libamdhip64.so.5 test double (same symbol version as Debian's HIP), found first via LD_LIBRARY_PATH."""
    hip = build.find_hip()
    d = tmp_path_factory.getbasetemp() / "fake_hip"
    if (d / "libamdhip64.so.5").exists():
        return d
    d.mkdir()
    (d / "v.map").write_text("hip_4.2 { global: hip*; local: *; };\n")
    subprocess.run(["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-D__HIP_PLATFORM_AMD__", f"-I{hip.include}",
                    str(FAKE_HIP_SRC), "-o", str(d / "libamdhip64.so.5"), f"-Wl,--version-script={d / 'v.map'}",
                    "-Wl,-soname,libamdhip64.so.5"], check=True, capture_output=True)
    return d


def _run_on_fake_gpu(fake_hip_dir: Path, runtime_lib: Path, body: str, log: Path) -> str:
    code = textwrap.dedent(f"""
        import sys; sys.modules["torch"] = None
        import numpy as np
        from vptq_mlc.runtime.rocm import load_rocm_runtime
        info = load_rocm_runtime({str(runtime_lib)!r})
        import tvm
        maps = open("/proc/self/maps").read()
        assert {str(fake_hip_dir)!r} in maps, "the HIP test double is not the one loaded"
        dev = tvm.rocm(0)
    """) + textwrap.dedent(body)
    res = _run(code, LD_LIBRARY_PATH=str(fake_hip_dir), FAKE_HIP_LOG=str(log), TVM_USE_RUNTIME_LIB="1")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _launches(log: Path) -> tuple[list[int], list[dict]]:
    mallocs, launches = [], []
    for line in log.read_text().splitlines():
        f = line.split()
        if f[0] == "malloc":
            mallocs.append(int(f[1]))
        elif f[0] == "launch":
            launches.append({"kernel": f[1], "grid": tuple(map(int, f[2:5])), "block": tuple(map(int, f[5:8])),
                             "shmem": int(f[8]), "args": bytes.fromhex(f[10]) if len(f) > 10 else b""})
    return mallocs, launches


def test_host_code_drives_our_runtime_on_a_pretend_gpu(fake_hip_dir, runtime_lib, rocm_lib, tmp_path):
    """TVM's host functions -> our device API (alloc, copies) -> our hip module -> hipModuleLaunchKernel: grid,
    block and kernarg bytes as the code object's metadata (written by LLVM) says the kernel reads them."""
    log = tmp_path / "hip.log"
    out = _run_on_fake_gpu(fake_hip_dir, runtime_lib, f"""
        print("device", dev.exist, dev.device_name, dev.warp_size)
        lib = tvm.runtime.load_module({str(rocm_lib)!r})
        n = 1000
        a = tvm.runtime.tensor(np.arange(n, dtype="float32"), dev)
        b = tvm.runtime.tensor(np.full(n, 2, dtype="float32"), dev)
        c = tvm.runtime.empty((n,), "float32", dev)
        lib["vadd"](a, b, c)
        print("roundtrip", np.array_equal(a.numpy(), np.arange(n, dtype="float32")))
        x = tvm.runtime.empty((1, 512), "float32", dev)
        w = tvm.runtime.empty((96, 512), "float32", dev)
        y = tvm.runtime.empty((1, 96), "float32", dev)
        lib["gemv"](x, w, y)
        m = tvm.runtime.empty((7,), "float64", dev)
        lib["mixed"](c, m, 1.5, -2.25, 3)
    """, log)
    assert "device True Fake AMD GPU (test double) 64" in out and "roundtrip True" in out
    mallocs, launches = _launches(log)
    (co,) = inspect_library(rocm_lib)
    by_name = {ln["kernel"]: ln for ln in launches}
    assert set(by_name) == {"vadd_kernel", "gemv_kernel", "mixed_kernel"}
    for ln in launches:
        meta = co.kernels[ln["kernel"]]
        assert len(ln["args"]) <= meta[".kernarg_segment_size"]
        assert ln["block"][0] * ln["block"][1] * ln["block"][2] <= meta[".max_flat_workgroup_size"]
        assert ln["shmem"] + meta[".group_segment_fixed_size"] <= 65536

    def arg(ln, name, fmt):
        a = next(x for x in co.kernels[ln["kernel"]][".args"] if x.get(".name") == name)
        return struct.unpack_from(fmt, ln["args"], a[".offset"])[0]

    a_ptr, b_ptr, c_ptr = mallocs[:3]
    v = by_name["vadd_kernel"]
    assert v["grid"] == (16, 1, 1) and v["block"] == (64, 1, 1)  # ceil(1000 / 64) blocks of 64
    assert (arg(v, "A", "<Q"), arg(v, "B", "<Q"), arg(v, "C", "<Q"), arg(v, "n", "<i")) == (a_ptr, b_ptr, c_ptr, 1000)
    mx = by_name["mixed_kernel"]
    assert (arg(mx, "A", "<Q"), arg(mx, "B", "<Q")) == (c_ptr, mallocs[-1])
    assert (arg(mx, "alpha", "<f"), arg(mx, "beta", "<d"), arg(mx, "off", "<q")) == (1.5, -2.25, 3)
    assert (arg(mx, "n", "<i"), arg(mx, "m", "<q")) == (1000, 7)


def test_wrong_arch_library_names_both_archs(fake_hip_dir, runtime_lib, tmp_path):
    """The pretend GPU is a gfx90a (like ROCr, it refuses other ISAs): a gfx1100 library fails with our message."""
    from test_rocm_compile import _toolchain_or_skip, build_rocm_kernels

    _toolchain_or_skip()
    lib1100 = build_rocm_kernels("gfx1100", tmp_path / "k1100.so")
    out = _run_on_fake_gpu(fake_hip_dir, runtime_lib, f"""
        lib = tvm.runtime.load_module({str(lib1100)!r})
        a = tvm.runtime.empty((8,), "float32", dev)
        try:
            lib["vadd"](a, a, a)
        except RuntimeError as e:
            print("ERR", e)
    """, tmp_path / "hip.log")
    assert "ERR cannot load the ROCm code object" in out
    assert "the library is for gfx1100 with code object v5" in out and "this GPU is gfx90a" in out
