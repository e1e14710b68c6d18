"""Target names users type (`llvm`, `cuda`, `rocm`, with `--arch` lists) -> TVM targets to build, one library each.

CUDA builds one library holding a fatbin for every arch (compile/cuda.py); ROCm builds one library per gfx
arch (compile/rocm.py), since TVM has no multi-arch container for HSACO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tvm
from tvm.target import Target

from vptq_mlc.errors import CompileError

SUPPORTED = ("llvm", "cuda", "rocm")
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_ROCM_ARCHS = ("gfx90a", "gfx942", "gfx1100")


@dataclass
class BuildTarget:
    """One library to build: the TVM target, a file-name label, and set-up to run before compiling."""

    target: Target
    label: str  # "llvm", "cuda", "rocm-gfx90a"
    archs: tuple[str, ...] = ()
    prepare: Callable[[], None] = field(default=lambda: None)
    metadata: dict = field(default_factory=dict)  # `_metadata["target"]`: what the library needs of its host

    @property
    def kind(self) -> str:
        return self.target.kind.name


def _archs(arch: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a.strip() for a in arch.split(",") if a.strip()) if arch else default


def resolve_targets(name: str, arch: str | None = None) -> list[BuildTarget]:
    kind = {"cpu": "llvm"}.get(name.strip().lower(), name.strip().lower())
    if kind == "llvm":  # the host's CPU by default; --arch for portable builds (compile/cpu.py)
        from vptq_mlc.compile import cpu

        return [BuildTarget(a.target, a.label, (a.label.removeprefix("llvm-"),), metadata=a.metadata())
                for a in cpu.parse_archs(arch)]
    if kind == "cuda":
        from vptq_mlc.compile import cuda

        archs = _archs(arch, DEFAULT_CUDA_ARCHS)
        return [cuda.build_target(archs)]
    if kind == "rocm":
        from vptq_mlc.compile import rocm

        return [rocm.build_target(a) for a in _archs(arch, DEFAULT_ROCM_ARCHS)]
    raise CompileError(
        f"unknown target {name!r}; choose one of {', '.join(SUPPORTED)} (e.g. --target cuda --arch sm_90)"
    )


def relax_pipeline(target: Target) -> tvm.transform.Pass:
    """GPU targets need the target pipeline (dlight schedules every op we did not schedule by hand); llvm gets
    compile/cpu.py's (dense matmuls scheduled for the CPU, no fusion, so our kernels keep their schedules)."""
    from tvm import relax

    if target.kind.name == "cuda":
        from vptq_mlc.compile.cuda import relax_pipeline as cuda_pipeline

        return cuda_pipeline(target)
    if "gpu" in target.keys:
        return relax.get_default_pipeline(target)
    if target.kind.name == "llvm":
        from vptq_mlc.compile.cpu import relax_pipeline as cpu_pipeline

        return cpu_pipeline(target)
    return tvm.transform.Sequential([relax.transform.FuseTransposeMatmul(), relax.get_pipeline("default")])
