"""Kernel choice per (target, layer config, static row count): the one place that knows which kernel runs where.

- llvm: the generic TE kernel with its CPU schedule; other targets without hand-scheduled kernels: generic.
- cuda: static row counts 1..8 (decode) -> hand-scheduled VQ-GEMV (`cuda_gemv.py`); other row counts
  (prefill, symbolic batch) -> dequantize-in-shared-memory matmul scheduled by dlight (`cuda_prefill.py`).
  CUDA kernels carry `op_pattern = kOpaque` so Relax FuseOps never fuses them with neighbours (fusing a
  call_tir kernel failed in FuseTIR with "Inconsistent buffers y and lv.. mapped to the same relax var", and
  a fused function would lose our schedule), and `tirx.is_scheduled` so dlight leaves them alone.
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
OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque


def _cuda_select(target: Target) -> KernelSelector:
    from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS, vq_gemv_cuda
    from vptq_mlc.tir_kernels.cuda_prefill import dequant_matmul_cuda

    def select(cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> tirx.PrimFunc:
        if rows is not None and 1 <= rows <= MAX_ROWS:
            func = vq_gemv_cuda(cfg, dtype, rows)
        else:
            func = dequant_matmul_cuda(cfg, dtype, target)
        return func.with_attr("op_pattern", OP_PATTERN_OPAQUE).with_attr("tirx.is_scheduled", True)

    return select


def kernel_selector(target: Target) -> KernelSelector:
    """A cached selector, so identical layers share one PrimFunc in the library."""
    if target.kind.name == "cuda":
        return functools.lru_cache(maxsize=None)(_cuda_select(target))

    @functools.lru_cache(maxsize=None)
    def select(cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> tirx.PrimFunc:
        func = vq_matmul_generic(cfg, dtype)
        return schedule_cpu(func) if target.kind.name == "llvm" else func

    return select


def static_decode_batches(target: Target) -> tuple[int, ...]:
    """Batch sizes worth a static `batch_decode_b<n>` function (those with a dedicated decode kernel).

    None yet: on CUDA, static batches 2..8 would get the GEMV kernel, but dlight's reduction schedule for the
    norm-bias row sum (`model/vptq_linear.py`) then asks for more than 48 KB of static shared memory at the
    7B shapes (ptxas: "uses too much shared data", seen for n >= 2). The engine and model support the split
    (tested on llvm); enable it here once that reduction is scheduled by hand or folded into the kernel.
    """
    return ()
