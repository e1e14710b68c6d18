"""Write the runtime-only TVM for deploy hosts: the installed apache-tvm package without its compiler
(`libtvm_compiler.so` alone is ~259 MB), plus apache-tvm-ffi and typing_extensions, in one folder (or tarball)
that works with `PYTHONPATH=<bundle>`. TVM notices the missing compiler and runs runtime-only
(docs/tvm-0.27-notes.md §6); model libraries load and run through `tvm.runtime` as usual.

The host still needs Python with numpy (and ml_dtypes for bfloat16 numpy conversions). `tvm_ffi` contains a
CPython extension, so the bundle is tied to one Python minor version: the running one, or another one given
as `python_version` (its apache-tvm-ffi wheel is fetched with pip) or `ffi_wheel`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from vptq_mlc.errors import VPTQMLCError

log = logging.getLogger(__name__)

# Dropped from tvm/: the compiler and build-only files. include/ is kept with include_rocm (our ROCm runtime
# is compiled on the AMD host against it).
_TVM_DROP = ("lib/libtvm_compiler.so", "src", "include", "3rdparty", "lib64")
# Dropped from tvm_ffi/: sources and build helpers (include/ is kept with include_rocm).
_FFI_DROP = ("src", "3rdparty", "cython", "include", "share", "cmake", "CMakeLists.txt")


class BundleError(VPTQMLCError):
    """The runtime bundle cannot be written."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"python package {name} is not installed; pip install apache-tvm==0.27.0.post1")
    return Path(list(spec.submodule_search_locations)[0])


def _copy_tree(src: Path, dst: Path, drop: tuple[str, ...]) -> None:
    dropped = {src / d for d in drop}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or Path(folder, n) in dropped]

    shutil.copytree(src, dst, ignore=ignore, symlinks=False)


def _ffi_wheel_for(python_version: str, dest: Path) -> Path:
    """Download the apache-tvm-ffi wheel matching the installed version for another CPython (pip)."""
    version = metadata.version("apache-tvm-ffi")
    cmd = [
        sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={version}", "--no-deps",
        "--only-binary=:all:", "--python-version", python_version, "--platform", "manylinux_2_28_x86_64",
        "-d", str(dest), "-q",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("apache_tvm_ffi-*.whl"))
    if res.returncode != 0 or not wheels:
        raise BundleError(
            f"could not fetch apache-tvm-ffi {version} for Python {python_version} ({res.stderr.strip()[-300:]}); "
            "download the wheel yourself and pass it with --ffi-wheel"
        )
    return wheels[0]


def _unpack_ffi_wheel(wheel: Path, dst_root: Path, include_rocm: bool) -> str:
    """Extract tvm_ffi/ (and its dist-info) from a wheel; returns the wheel's python tag."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            top = name.split("/", 1)
            if top[0] == "tvm_ffi" and len(top) > 1:
                first = top[1].split("/", 1)[0]
                if first in _FFI_DROP and not (include_rocm and first == "include"):
                    continue
                if "__pycache__" in name:
                    continue
            elif not top[0].endswith(".dist-info"):
                continue
            z.extract(name, dst_root)
    parts = wheel.name[:-4].split("-")
    return parts[-3] if len(parts) >= 5 else "unknown"


def _tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def write_runtime_bundle(
    out_dir: str | os.PathLike[str],
    include_rocm: bool = False,
    *,
    python_version: str | None = None,
    ffi_wheel: str | os.PathLike[str] | None = None,
    tarball: bool = False,
) -> Path:
    """Write the bundle to `out_dir` (a folder; or `out_dir` as a .tar.gz when `tarball`). Returns its path.

    include_rocm keeps the TVM and TVM-FFI headers, which building our ROCm runtime on the AMD host needs
    (`python -m vptq_mlc.rocm_runtime.build`).
    """
    out = Path(out_dir)
    if out.exists():
        raise BundleError(f"{out} already exists; remove it or choose another output path")
    tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
    if not (tvm_dir / "lib" / "libtvm_runtime.so").exists():
        raise BundleError(f"{tvm_dir}/lib/libtvm_runtime.so not found; reinstall apache-tvm 0.27.0.post1")
    te_spec = importlib.util.find_spec("typing_extensions")
    if te_spec is None or not te_spec.origin:
        raise BundleError("typing_extensions is not installed (tvm_ffi needs it); pip install typing_extensions")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        root = work / "bundle"
        tvm_drop = tuple(d for d in _TVM_DROP if not (include_rocm and d == "include"))
        _copy_tree(tvm_dir, root / "tvm", tvm_drop)
        if ffi_wheel is None and python_version not in (None, here):
            ffi_wheel = _ffi_wheel_for(python_version, work / "wheel")
        if ffi_wheel is not None:
            py_tag = _unpack_ffi_wheel(Path(ffi_wheel), root, include_rocm)
        else:
            ffi_drop = tuple(d for d in _FFI_DROP if not (include_rocm and d == "include"))
            _copy_tree(ffi_dir, root / "tvm_ffi", ffi_drop)
            py_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        dists = ["apache_tvm"] + (["apache_tvm_ffi"] if ffi_wheel is None else [])  # a wheel brings its own
        for dist in dists:
            info = next(tvm_dir.parent.glob(f"{dist}-*.dist-info"), None)
            if info is not None:
                shutil.copytree(info, root / info.name)
        shutil.copy2(te_spec.origin, root / "typing_extensions.py")
        nfiles, nbytes = _tree_size(root)
        manifest = {
            "apache-tvm": metadata.version("apache-tvm"),
            "apache-tvm-ffi": metadata.version("apache-tvm-ffi"),
            "python": py_tag,
            "include_rocm": include_rocm,
            "files": nfiles,
            "bytes": nbytes,
            "usage": "PYTHONPATH=<this folder> python -c 'import tvm.runtime'  (runtime-only: no compiler)",
        }
        (root / "BUNDLE.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if tarball:
            tar_tmp = work / "bundle.tar.gz"
            with tarfile.open(tar_tmp, "w:gz") as tf:
                for p in sorted(root.iterdir()):
                    tf.add(p, arcname=p.name)
            os.replace(tar_tmp, out)
        else:
            os.replace(root, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("runtime bundle %s: %d files, %.1f MB unpacked (python %s)", out, nfiles, nbytes / 1e6, py_tag)
    return out
