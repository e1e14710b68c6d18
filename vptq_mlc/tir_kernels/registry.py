"""Kernel choice per (target, layer config, static row count): the one place that knows which kernel runs where.

Targets without a hand-scheduled kernel get the generic TE kernel (unscheduled on llvm; on GPUs the
relax pipeline's dlight fallback schedules it, correctly but slowly).
"""

from __future__ import annotations

import functools
from typing import Callable

from tvm import tirx
from tvm.target import Target

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.generic import schedule_cpu, vq_matmul_generic

# (layer config, model dtype, static row count or None) -> PrimFunc(xs, *operands, y)
KernelSelector = Callable[[VPTQLayerConfig, str, "int | None"], tirx.PrimFunc]


def kernel_selector(target: Target) -> KernelSelector:
    """A cached selector, so identical layers share one PrimFunc in the library."""

    @functools.lru_cache(maxsize=None)
    def select(cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> tirx.PrimFunc:
        func = vq_matmul_generic(cfg, dtype)
        return schedule_cpu(func) if target.kind.name == "llvm" else func

    return select
