"""The llvm target: `--arch` parsing into LLVM CPU/triple/features, the CPU features a library records, the
one-line refusal of a library whose instructions this CPU lacks, and the dense-row schedule against numpy."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import tvm
from tvm import te
from tvm.target import codegen

from vptq_mlc.artifact.cpu_features import host_cpu_flags, missing_features
from vptq_mlc.compile import cpu
from vptq_mlc.compile.targets import resolve_backend
from vptq_mlc.errors import CompileError, RuntimeLoadError
from vptq_mlc.runtime.library import check_cpu_features

x86_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 feature levels")


def test_levels_map_to_llvm_cpus_and_psabi_features():
    v2, v3, v4 = (cpu.parse_arch(f"x86-64-v{n}") for n in (2, 3, 4))
    assert [a.target.attrs["mcpu"] for a in (v2, v3, v4)] == ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
    assert all(str(a.target.attrs["mtriple"]) == "x86_64-linux-gnu" and a.machine == "x86_64" for a in (v2, v3, v4))
    # the x86-64 psABI levels: v2 SSE4.2/POPCNT, v3 + AVX2/FMA/F16C/BMI2, v4 + AVX-512 F/BW/CD/DQ/VL
    assert {"sse4_2", "popcnt", "ssse3"} <= set(v2.features) and "avx" not in v2.features
    assert {"avx2", "fma", "f16c", "bmi2"} <= set(v3.features) and "avx512f" not in v3.features
    assert {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= set(v4.features)
    assert (v2.label, v3.label, v4.label) == ("llvm-x86-64-v2", "llvm-x86-64-v3", "llvm-x86-64-v4")
    assert cpu.vector_lanes(v2.target) == 4 and cpu.vector_lanes(v3.target) == 8 and cpu.vector_lanes(v4.target) == 16


def test_aarch64_and_named_cpus():
    arm = cpu.parse_arch("aarch64")
    assert str(arm.target.attrs["mtriple"]) == "aarch64-linux-gnu" and arm.machine == "aarch64"
    assert arm.features == ("asimd",) and arm.label == "llvm-aarch64"
    n1 = cpu.parse_arch("neoverse-n1")
    assert n1.machine == "aarch64" and {"asimd", "asimddp", "asimdhp"} <= set(n1.features)
    zen4 = cpu.parse_arch("znver4")
    assert zen4.machine == "x86_64" and "avx512f" in zen4.features and zen4.label == "llvm-znver4"


def test_native_is_the_host_cpu_minus_missing_flags():
    (bt,) = resolve_backend("llvm")
    host = cpu.native_arch()
    assert bt.target.attrs["mcpu"] == codegen.llvm_get_system_cpu() and bt.label == f"llvm-{host.target.attrs['mcpu']}"
    assert bt.metadata["cpu_features"] == list(host.features) and bt.metadata["machine"] == platform.machine()
    flags = host_cpu_flags()
    if flags is not None:  # everything the host build needs is in /proc/cpuinfo
        assert set(host.features) <= flags


def test_bad_arch_is_one_line_error():
    with pytest.raises(CompileError, match=r"unknown CPU arch 'x86-64-v9'.*x86-64-v3.*aarch64"):
        resolve_backend("llvm", "x86-64-v9")
    with pytest.raises(CompileError, match="twice"):
        resolve_backend("llvm", "x86-64-v3,x86-64-v3")
    assert [bt.label for bt in resolve_backend("cpu", "x86-64-v3, aarch64")] == ["llvm-x86-64-v3", "llvm-aarch64"]


def _meta(features: list[str], machine: str | None = None) -> dict:
    return {"target": {"kind": "llvm", "arch": "x86-64-v4", "mcpu": "x86-64-v4",
                       "machine": machine or platform.machine(), "cpu_features": features}}


def test_library_for_missing_features_is_refused(tmp_path, monkeypatch):
    import vptq_mlc.artifact.cpu_features as cf

    monkeypatch.setattr(cf, "host_cpu_flags", lambda: {"sse2", "sse4_2", "avx", "avx2"})
    lib = tmp_path / "m-llvm-x86-64-v4.so"
    check_cpu_features(lib, _meta(["sse4_2", "avx2"]))  # all present: loads
    with pytest.raises(RuntimeLoadError) as e:
        check_cpu_features(lib, _meta(["avx2", "avx512bw", "avx512f"]))
    msg = str(e.value)
    assert "\n" not in msg and "m-llvm-x86-64-v4.so" in msg and "avx512bw, avx512f" in msg and "--arch" in msg
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    with pytest.raises(RuntimeLoadError, match="lacks"):
        check_cpu_features(lib, _meta(["asimd"], other))
    check_cpu_features(lib, {"target": {"kind": "cuda"}})  # GPU libraries: nothing to check here
    check_cpu_features(lib, {})  # libraries from before the field: nothing recorded, nothing checked
    monkeypatch.setattr(cf, "host_cpu_flags", lambda: None)  # no /proc/cpuinfo: cannot tell, loads
    assert missing_features(["avx512f"]) is None


@x86_only
def test_library_records_its_features_and_loads_here(tmp_path):
    """A real (tiny) library compiled for x86-64-v2 records its level's features and loads on this host."""
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.runtime.library import load_library
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-0", num_layers=1, dtype="float16", seed=2)
    model_dir = convert_checkpoint(ckpt, tmp_path / "mlc")
    (lib,) = compile_model(model_dir, "llvm", arch="x86-64-v2")
    assert lib.name.endswith("-llvm-x86-64-v2.so")
    meta = load_library(lib, "cpu").metadata
    assert meta["target"]["arch"] == "x86-64-v2" and "sse4_2" in meta["target"]["cpu_features"]
    assert json.loads(json.dumps(meta["target"])) == meta["target"]


@pytest.mark.parametrize("rows,dtype", [(1, "float16"), (3, "float32")])
def test_dense_rows_schedule_matches_numpy(rows, dtype):
    """The lm_head schedule (rfactor over k, parallel over output rows) against numpy, with a row count that is
    not a multiple of the 16-row parallel tile and k not a multiple of the vector width."""
    n, out_rows, k = tvm.tirx.Var("n", "int64"), 1000, 72
    x = te.placeholder((n, 1, k), dtype, name="x")
    w = te.placeholder((out_rows, k), dtype, name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((n, 1, out_rows), lambda b, s, o: te.sum(x[b, s, r].astype("float32") * w[o, r].astype("float32"),
                                                         axis=r), name="y")
    target = cpu.native_arch().target
    func = cpu.schedule_dense_rows(te.create_prim_func([x, w, y]), cpu.vector_lanes(target))
    assert func is not None
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(0)
    xn, wn = rng.standard_normal((rows, 1, k)).astype(dtype), rng.standard_normal((out_rows, k)).astype(dtype)
    dev = tvm.cpu()
    out = tvm.runtime.empty((rows, 1, out_rows), "float32", dev)
    lib["main"](tvm.runtime.tensor(xn, dev), tvm.runtime.tensor(wn, dev), out)
    want = xn[:, 0].astype(np.float64) @ wn.astype(np.float64).T
    np.testing.assert_allclose(out.numpy()[:, 0], want, rtol=1e-5, atol=1e-4)


def test_thread_pool_set_up_keeps_the_process_on_its_cpus():
    """Loading a CPU library sets TVM_NUM_THREADS to the pool's size (so parallel launches stop re-reading
    /sys/devices/system/cpu/online) and leaves the thread on every CPU it had: TVM's pool pins its creator to its
    "big" cores (CPU 0 alone on a 2-vCPU VM), which would put every later thread of the process (torch's, the
    server's) on one core. A fresh process, since the pool is per thread and made once."""
    import os
    import subprocess
    import sys

    code = ("import os, tvm\nfrom vptq_mlc.runtime.library import pin_cpu_thread_count\n"
            "before = sorted(os.sched_getaffinity(0))\npin_cpu_thread_count()\n"
            "size = tvm.get_global_func('runtime.NumThreads')()\n"
            "print(before == sorted(os.sched_getaffinity(0)), os.environ['TVM_NUM_THREADS'] == str(size))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
