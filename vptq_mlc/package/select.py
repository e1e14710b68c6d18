"""Pick the packaged library that fits this host (GPU vendor and arch, else CPU) and verify it against the manifest.

Matching: cuda needs SASS for the GPU's major version with a minor version <= the GPU's (sm_80 code runs on
sm_86/sm_89, not on sm_90); rocm needs the exact gfx arch; llvm needs the same CPU architecture and every CPU
feature the library was compiled to use (/proc/cpuinfo), the one using the most features winning. With
device "auto" the first of cuda:0, rocm:0, cpu that is present and has a fitting library wins.
Imports only tvm.runtime (through runtime/device.py), so it works on runtime-only deploy hosts.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.package.config import PackageError
from vptq_mlc.package.manifest import read_manifest, verify_file

if TYPE_CHECKING:
    from vptq_mlc.runtime.device import DeviceLike, DeviceSpec

log = logging.getLogger(__name__)
_KIND_OF_DEVICE = {"cpu": "llvm", "cuda": "cuda", "rocm": "rocm"}


@dataclass(frozen=True)
class HostDevice:
    device: str  # "cuda:0", "rocm:0", "cpu"
    kind: str  # library target kind: cuda, rocm, llvm
    arch: str  # sm_90, gfx90a, x86_64
    name: str = ""


def _sm(compute_version: str) -> str:
    major, minor = compute_version.split(".")[:2]
    return f"sm_{major}{minor}"


def probe_device(device: DeviceLike) -> HostDevice | None:
    """The device and its arch if present, else None (never raises for a missing GPU or driver)."""
    from vptq_mlc.runtime.device import resolve_device

    try:
        spec, dev = resolve_device(device)
    except RuntimeLoadError as e:
        log.info("%s: %s", device, e)
        return None
    if spec.kind == "cpu":
        return HostDevice("cpu", "llvm", platform.machine(), "cpu")
    try:
        if spec.kind == "cuda":
            arch = _sm(str(dev.compute_version))
        else:
            arch = str(dev._GetDeviceAttr(10, spec.index, 10)).split(":")[0]  # kGcnArch: "gfx90a:sramecc+:xnack-"
        name = str(dev.device_name)
    except Exception as e:  # noqa: BLE001 - an unusable GPU is not a candidate
        log.info("%s: cannot query the arch (%s)", spec, e)
        return None
    return HostDevice(str(spec), spec.kind, arch, name)


def fits(lib: dict[str, Any], host: HostDevice) -> bool:
    if lib.get("target") != host.kind:
        return False
    if host.kind == "llvm":
        from vptq_mlc.artifact.cpu_features import missing_features

        abi = lib.get("abi", {})
        return abi.get("machine", host.arch) == host.arch and not missing_features(abi.get("cpu_features", []))
    if host.kind == "rocm":
        return host.arch in lib.get("archs", [])
    m = re.fullmatch(r"sm_(\d+)(\d)", host.arch)
    for a in lib.get("archs", []):
        la = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", a)
        if not (m and la and la.group(1) == m.group(1)):
            continue
        # arch-specific code (sm_90a: wgmma) runs on that arch alone; plain SASS on later minors of its major too
        if int(la.group(2)) == int(m.group(2)) or (not la.group(3) and int(la.group(2)) < int(m.group(2))):
            return True
    return False


def _arch_rank(lib: dict[str, Any], host: HostDevice) -> int:
    """2: arch-specific code for this GPU (sm_90a on sm_90, which has kernels the plain build lacks), 1: this exact
    arch, 0: an older minor's SASS or a CPU library."""
    archs = lib.get("archs", [])
    return 2 if host.arch + "a" in archs else 1 if host.arch in archs else 0


def _describe_offers(libs: list[dict[str, Any]]) -> str:
    return "; ".join(f"{lib['target']} {','.join(lib.get('archs') or [lib.get('abi', {}).get('machine', '')])}"
                     for lib in libs) or "no libraries"


def select_library(model_dir: str | os.PathLike[str], device: DeviceLike = "auto") -> tuple[Path, DeviceSpec]:
    """(verified library path, device) for this host, from the package's manifest; `device` None or "auto" tries
    cuda:0, rocm:0, cpu in that order."""
    from vptq_mlc.runtime.device import DeviceSpec, as_device  # imports tvm: only when a package is used

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    libs = manifest["libraries"]
    spec = as_device(device)
    cands = [DeviceSpec("cuda"), DeviceSpec("rocm"), DeviceSpec("cpu")] if spec is None else [spec]
    seen = []
    for cand in cands:
        host = probe_device(cand)
        if host is None:
            continue
        seen.append(f"{host.device} ({host.arch}{', ' + host.name if host.name and host.kind != 'llvm' else ''})")
        matches = [lib for lib in libs if fits(lib, host)]
        if matches:
            # prefer the exact arch (e.g. sm_90 SASS over sm_80 on an sm_90 GPU is required; sm_86 over sm_80 on sm_86),
            # and its arch-specific build over that (sm_90a over sm_90); on CPUs the build that uses the most of this
            # CPU's features (x86-64-v4 over v3 on an AVX-512 host)
            best = max(matches, key=lambda lib: (_arch_rank(lib, host),
                                                 len(lib.get("abi", {}).get("cpu_features", []))))
            path = verify_file(model_dir, best["file"], best, "library")
            log.info("package %s: %s for %s", model_dir.name, best["file"], host.device)
            return path, cand
    has = ", ".join(seen) or f"no usable device for {spec or 'auto'}"
    raise PackageError(
        f"no library in {model_dir} fits this host: it has {has}; "
        f"the package offers {_describe_offers(libs)}; add a matching target to the package config and re-run "
        "vptq-mlc package (or pass --device / --lib)"
    )
