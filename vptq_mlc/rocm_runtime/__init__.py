"""vptq-mlc's ROCm runtime for TVM: a small C++ library (sources in `src/`) that registers the ROCm device API
and the loader of TVM's `hip` modules, which the apache-tvm wheel does not ship.

Build it on (or for) the AMD host with `python -m vptq_mlc.rocm_runtime.build`; load it with
`vptq_mlc.runtime.rocm.load_rocm_runtime()` before loading a ROCm model library. It is built against the
host's own HIP because HIP's soname and some structs change between ROCm major versions.
"""

from __future__ import annotations

import os
from pathlib import Path

LIB_NAME = "libvptq_rocm_runtime.so"
SRC_DIR = Path(__file__).resolve().parent / "src"
ENV_LIB = "VPTQ_MLC_ROCM_RUNTIME"


def default_library_path() -> Path:
    """Where the build writes and the loader looks: $VPTQ_MLC_ROCM_RUNTIME, else next to this package."""
    env = os.environ.get(ENV_LIB)
    return Path(env) if env else Path(__file__).resolve().parent / LIB_NAME
