"""Target names users type (`llvm` or `cpu`, `cuda`, `rocm`, with `--arch` lists) -> the target backends to build,
one library each (compile/backend.py says what a backend carries).

CUDA builds one library holding a fatbin for every arch (compile/cuda.py); ROCm builds one library per gfx
arch (compile/rocm.py), since TVM has no multi-arch container for HSACO; llvm one per CPU arch (compile/cpu.py).
"""

from __future__ import annotations

from vptq_mlc.compile.backend import TargetBackend
from vptq_mlc.compile.cpu import CpuBackend
from vptq_mlc.compile.cuda import CudaBackend
from vptq_mlc.compile.rocm import RocmBackend
from vptq_mlc.errors import CompileError

BACKENDS: dict[str, type[TargetBackend]] = {b.kind: b for b in (CpuBackend, CudaBackend, RocmBackend)}
ALIASES = {"cpu": "llvm"}
SUPPORTED = tuple(BACKENDS)


def resolve_backend(name: str, arch: str | None = None) -> list[TargetBackend]:
    """The backends `--target NAME --arch ARCH` builds (arch None: the target's defaults), one per library."""
    kind = name.strip().lower()
    backend = BACKENDS.get(ALIASES.get(kind, kind))
    if backend is None:
        raise CompileError(
            f"unknown target {name!r}; choose one of {', '.join(SUPPORTED)} (e.g. --target cuda --arch sm_90)"
        )
    return backend.resolve(arch)
