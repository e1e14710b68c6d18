"""`vptq-mlc runtime-bundle`: the runtime-only TVM (no libtvm_compiler.so) for deploy hosts. A fresh process with
PYTHONPATH=<bundle> must import TVM from the bundle (not site-packages), run runtime-only, and load + run an llvm
library; results are compared with numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vptq_mlc.cli import main
from vptq_mlc.compile.runtime_bundle import BundleError, write_runtime_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_runtime_bundle(tmp_path_factory.mktemp("rb") / "tvm-runtime")


@pytest.fixture(scope="module")
def llvm_lib(tmp_path_factory) -> Path:
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def axpy(A: T.Buffer((64,), "float32"), B: T.Buffer((64,), "float32"), C: T.Buffer((64,), "float32")):
        for i in range(64):
            C[i] = A[i] * T.float32(3) + B[i]

    out = tmp_path_factory.mktemp("rb_lib") / "axpy.so"
    tvm.compile(tvm.IRModule({"axpy": axpy}), target="llvm").export_library(str(out))
    return out


def test_bundle_contents(bundle):
    assert (bundle / "tvm" / "lib" / "libtvm_runtime.so").exists()
    assert not (bundle / "tvm" / "lib" / "libtvm_compiler.so").exists()
    for gone in ("src", "include", "3rdparty"):
        assert not (bundle / "tvm" / gone).exists()
    assert (bundle / "tvm_ffi" / "lib" / "libtvm_ffi.so").exists() and (bundle / "typing_extensions.py").exists()
    meta = json.loads((bundle / "BUNDLE.json").read_text())
    assert meta["apache-tvm"] == "0.27.0.post1" and meta["python"] == f"cp{sys.version_info[0]}{sys.version_info[1]}"
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert meta["bytes"] <= size < 40e6  # ~21 MB; the full wheel's tvm/ is ~305 MB


def test_runtime_only_import_and_run_from_bundle(bundle, llvm_lib):
    code = f"""
        import sys
        sys.modules["torch"] = None  # tvm_ffi would import site-packages torch; the deploy host has none
        import numpy as np
        import tvm, tvm.runtime, tvm_ffi
        print("tvm from", tvm.__file__)
        print("ffi from", tvm_ffi.__file__)
        print("runtime only", tvm.base._RUNTIME_ONLY)
        lib = tvm.runtime.load_module({str(llvm_lib)!r})
        a = np.linspace(-1, 1, 64, dtype="float32"); b = np.arange(64, dtype="float32")
        c = tvm.runtime.empty((64,), "float32", tvm.cpu())
        lib["axpy"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
        np.save({str(llvm_lib.parent / "out.npy")!r}, c.numpy())
        maps = open("/proc/self/maps").read()
        print("compiler mapped", "libtvm_compiler" in maps)
        print("site tvm mapped", {str(Path(np.__file__).parents[1] / "tvm")!r} in maps)
    """
    env = dict(os.environ, PYTHONPATH=str(bundle))
    env.pop("TVM_USE_RUNTIME_LIB", None)  # runtime-only must follow from the missing compiler alone
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"tvm from {bundle}/tvm/__init__.py" in out and f"ffi from {bundle}/tvm_ffi/__init__.py" in out
    assert "runtime only True" in out and "compiler mapped False" in out and "site tvm mapped False" in out
    a = np.linspace(-1, 1, 64, dtype="float32")
    b = np.arange(64, dtype="float32")
    np.testing.assert_allclose(np.load(llvm_lib.parent / "out.npy"), a * 3 + b, rtol=1e-6)


def test_cli_tarball_and_rocm_headers(tmp_path):
    res = CliRunner().invoke(main, ["runtime-bundle", str(tmp_path / "rt.tar.gz"), "--include-rocm"])
    assert res.exit_code == 0, res.output
    assert "MB" in res.output
    with tarfile.open(tmp_path / "rt.tar.gz") as tf:
        names = tf.getnames()
    assert "tvm/include/tvm/runtime/device_api.h" in names and "tvm_ffi/include/dlpack/dlpack.h" in names
    assert "tvm/lib/libtvm_compiler.so" not in names and "BUNDLE.json" in names


def test_existing_output_is_refused(bundle):
    with pytest.raises(BundleError, match="already exists"):
        write_runtime_bundle(bundle)
    res = CliRunner().invoke(main, ["runtime-bundle", str(bundle)])
    assert res.exit_code == 1 and "error:" in res.output and "already exists" in res.output
