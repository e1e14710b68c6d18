"""Load vptq-mlc's ROCm runtime (`libvptq_rocm_runtime.so`) so TVM can run ROCm model libraries.

The apache-tvm wheel has no ROCm runtime: without this, loading a ROCm library fails with "a loader of that
name (hip) is not registered". Loading the library registers `device_api.rocm` and the `hip` module loader.
Call `load_rocm_runtime()` once, after importing tvm and before `tvm.runtime.load_module`. It works on hosts
without an AMD GPU too; anything that needs the GPU then fails with a clear "no ROCm device" error.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.rocm_runtime import ENV_LIB, default_library_path

log = logging.getLogger(__name__)
_LOADED: dict[str, Any] = {}


def load_rocm_runtime(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load (once) and return `vptq_rocm.info`: registered names, device_count, HIP versions."""
    import tvm.runtime  # noqa: F401  (loads libtvm_ffi / libtvm_runtime, which our library links to)
    import tvm_ffi

    if "lib" not in _LOADED:
        lib = Path(path) if path else default_library_path()
        if not lib.exists():
            raise RuntimeLoadError(
                f"ROCm runtime not built ({lib} missing); run `python -m vptq_mlc.rocm_runtime.build` on this "
                f"host (needs g++ and HIP headers) or set {ENV_LIB} to a built {lib.name}"
            )
        try:
            _LOADED["lib"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise RuntimeLoadError(
                f"cannot load {lib}: {e}; install the ROCm HIP runtime it was built against "
                "(libamdhip64) or rebuild it here with `python -m vptq_mlc.rocm_runtime.build --force`"
            ) from None
        _LOADED["path"] = str(lib)
    info_fn = tvm_ffi.get_global_func("vptq_rocm.info", allow_missing=True)
    if info_fn is None:
        raise RuntimeLoadError(f"{_LOADED['path']} loaded but registered nothing; rebuild it with --force")
    info = _to_python(info_fn())
    if "ffi.Module.load_from_bytes.hip" in info["skipped"]:
        log.info("another ROCm runtime is already registered; using it for hip modules")
    if info["device_count"] == 0:
        log.info("ROCm runtime loaded; no ROCm device (%s)", info["no_device_reason"])
    return info


def rocm_device_count() -> int:
    """Number of AMD GPUs HIP sees (0 on hosts without one); loads the runtime if needed."""
    return int(load_rocm_runtime()["device_count"])


def _to_python(v: Any) -> Any:
    if hasattr(v, "items"):
        return {str(k): _to_python(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or type(v).__name__ == "Array":
        return [_to_python(x) for x in v]
    if isinstance(v, str):
        return str(v)
    return v
