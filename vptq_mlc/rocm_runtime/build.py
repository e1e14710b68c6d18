"""Build `libvptq_rocm_runtime.so` with g++ against the headers of the installed apache-tvm / apache-tvm-ffi
wheels and the host's HIP (ROCm under $ROCM_PATH or /opt/rocm, or Debian's libamdhip64-dev).

    python -m vptq_mlc.rocm_runtime.build [--out PATH] [--force]

Does not import tvm (the compiler is not needed, and a runtime-only bundle works if it kept its headers).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.rocm_runtime import LIB_NAME, SRC_DIR, default_library_path

log = logging.getLogger(__name__)


@dataclass
class HipInstall:
    include: Path  # holds hip/hip_runtime_api.h
    lib: Path  # holds libamdhip64.so
    version: str  # from hip/hip_version.h


def _hip_version(include: Path) -> str:
    vals = {}
    f = include / "hip" / "hip_version.h"
    if f.exists():
        for line in f.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "#define" and parts[1] in ("HIP_VERSION_MAJOR", "HIP_VERSION_MINOR"):
                vals[parts[1]] = parts[2]
    return f"{vals.get('HIP_VERSION_MAJOR', '?')}.{vals.get('HIP_VERSION_MINOR', '?')}"


def find_hip() -> HipInstall:
    """HIP headers + libamdhip64: $ROCM_PATH / $HIP_PATH, /opt/rocm, then the system (Debian) folders."""
    roots = [Path(os.environ[e]) for e in ("ROCM_PATH", "HIP_PATH") if os.environ.get(e)]
    roots += [Path("/opt/rocm"), Path("/usr")]
    for root in roots:
        inc = root / "include"
        if not (inc / "hip" / "hip_runtime_api.h").exists():
            continue
        for lib in [root / "lib", root / "lib64", *sorted(root.glob("lib/*-linux-gnu"))]:
            if (lib / "libamdhip64.so").exists():
                return HipInstall(inc, lib, _hip_version(inc))
    raise RuntimeLoadError(
        "HIP headers/library not found (hip/hip_runtime_api.h, libamdhip64.so); install ROCm's HIP runtime "
        "development files (Debian/Ubuntu: apt-get install libamdhip64-dev; ROCm: rocm-hip-runtime-dev) "
        "or set ROCM_PATH"
    )


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeLoadError(f"python package {name} not found; pip install apache-tvm==0.27.0.post1")
    return Path(list(spec.submodule_search_locations)[0])


def tvm_build_paths() -> tuple[list[Path], list[Path]]:
    """(include dirs, library dirs) of the installed TVM and TVM-FFI."""
    tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
    incs = [tvm_dir / "include", ffi_dir / "include"]
    need = [tvm_dir / "include" / "tvm" / "runtime" / "device_api.h", ffi_dir / "include" / "dlpack" / "dlpack.h"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise RuntimeLoadError(
            f"TVM headers missing ({', '.join(missing)}); build with a full apache-tvm install or a runtime "
            "bundle written with --include-rocm (it keeps the headers)"
        )
    libs = [tvm_dir / "lib", ffi_dir / "lib"]
    for lib, name in ((libs[0], "libtvm_runtime.so"), (libs[1], "libtvm_ffi.so")):
        if not (lib / name).exists():
            raise RuntimeLoadError(f"{lib / name} not found; reinstall apache-tvm / apache-tvm-ffi")
    return incs, libs


def _sources() -> list[Path]:
    return sorted(SRC_DIR.glob("*.cc"))


def _up_to_date(out: Path) -> bool:
    if not out.exists():
        return False
    newest = max(p.stat().st_mtime for p in [*_sources(), *SRC_DIR.glob("*.h"), Path(__file__)])
    return out.stat().st_mtime >= newest


def build_rocm_runtime(out: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Compile and link the library (objects in parallel); atomic replace of `out`. Returns its path."""
    out = Path(out) if out else default_library_path()
    if not force and _up_to_date(out):
        log.info("%s is up to date", out)
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeLoadError("no C++ compiler found (g++); install one (Debian: apt-get install g++) or set CXX")
    hip = find_hip()
    incs, libs = tvm_build_paths()
    cflags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-D__HIP_PLATFORM_AMD__", "-Wall"]
    cflags += [f"-I{p}" for p in incs] + [f"-I{hip.include}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s with %s against HIP %s (%s)", out, cxx, hip.version, hip.include)
    with tempfile.TemporaryDirectory(prefix="vptq-rocm-rt-") as tmp:
        objs, procs = [], []
        for src in _sources():
            obj = Path(tmp) / (src.stem + ".o")
            objs.append(obj)
            procs.append(
                (src, subprocess.Popen([cxx, *cflags, "-c", str(src), "-o", str(obj)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            )
        errors = []
        for src, p in procs:
            text, _ = p.communicate()
            if p.returncode != 0:
                errors.append(f"{src.name}:\n{text}")
        if errors:
            raise RuntimeLoadError("compiling the ROCm runtime failed: " + "\n".join(errors)[-4000:])
        tmp_out = out.parent / f".{out.name}.{os.getpid()}.tmp"
        ldflags = ["-shared", "-Wl,--no-undefined", f"-Wl,-soname,{LIB_NAME}"]
        ldflags += [f"-L{p}" for p in libs] + [f"-L{hip.lib}", "-ltvm_runtime", "-ltvm_ffi", "-lamdhip64"]
        if not str(hip.lib).startswith(("/usr/lib", "/lib")):
            ldflags.append(f"-Wl,-rpath,{hip.lib}")  # e.g. /opt/rocm/lib, often not on the loader path
        res = subprocess.run([cxx, *map(str, objs), "-o", str(tmp_out), *ldflags], capture_output=True, text=True)
        if res.returncode != 0:
            tmp_out.unlink(missing_ok=True)
            raise RuntimeLoadError("linking the ROCm runtime failed: " + (res.stdout + res.stderr)[-4000:])
        os.replace(tmp_out, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vptq_mlc.rocm_runtime.build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help=f"output path (default: {default_library_path()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        path = build_rocm_runtime(args.out, force=args.force)
    except RuntimeLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
