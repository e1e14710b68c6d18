"""Kernel choice per (target, layer config, static row count): the one place that knows which kernel runs where.

- llvm: the generic TE kernel with its CPU schedule; other targets without hand-scheduled kernels: generic.
- cuda: static row counts 1..8 (decode) -> hand-scheduled VQ-GEMV (`cuda_gemv.py`); other row counts
  (prefill, symbolic batch) -> dequantize-in-shared-memory matmul scheduled by dlight (`cuda_prefill.py`).
  CUDA kernels carry `op_pattern = kOpaque` so Relax FuseOps never fuses them with neighbours (fusing a
  call_tir kernel failed in FuseTIR with "Inconsistent buffers y and lv.. mapped to the same relax var", and
  a fused function would lose our schedule), and `tirx.is_scheduled` so dlight leaves them alone.
- rocm: static row counts 1..8 -> the VQ-GEMV (`cuda_gemv.py`) with the target's parameters (`gpu_params`:
  wavefront 64 on CDNA / 32 on RDNA, static LDS, 256 threads); other row counts -> the dlight dequant matmul
  (`cuda_prefill.py`, same Matmul rule and config as on CUDA); norm-bias row dot as on CUDA. Built and
  inspected here, never run on AMD hardware.
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


def _rocm_select(target: Target) -> KernelSelector:
    from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS, gpu_params, vq_gemv_cuda
    from vptq_mlc.tir_kernels.cuda_prefill import dequant_matmul_cuda

    params = gpu_params(target)

    def select(cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> tirx.PrimFunc:
        if rows is not None and 1 <= rows <= MAX_ROWS:
            func = vq_gemv_cuda(cfg, dtype, rows, params=params)
        else:
            func = dequant_matmul_cuda(cfg, dtype, target)
        return func.with_attr("op_pattern", OP_PATTERN_OPAQUE).with_attr("tirx.is_scheduled", True)

    return select


def kernel_selector(target: Target) -> KernelSelector:
    """A cached selector, so identical layers share one PrimFunc in the library."""
    if target.kind.name == "cuda":
        return functools.lru_cache(maxsize=None)(_cuda_select(target))
    if target.kind.name == "rocm":
        return functools.lru_cache(maxsize=None)(_rocm_select(target))

    @functools.lru_cache(maxsize=None)
    def select(cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> tirx.PrimFunc:
        func = vq_matmul_generic(cfg, dtype)
        return schedule_cpu(func) if target.kind.name == "llvm" else func

    return select


def static_decode_batches(target: Target) -> tuple[int, ...]:
    """Batch sizes worth a static `batch_decode_b<n>` function (those with a dedicated decode kernel).

    CUDA and ROCm: 2..MAX_ROWS, the row counts of the hand-scheduled GEMV (the norm-bias row dot has its own
    kernel, `norm_bias_selector`, since dlight's reduction schedule for static batches overflowed shared memory).
    """
    if target.kind.name == "cuda":
        from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS

        return tuple(range(2, MAX_ROWS + 1))
    if target.kind.name == "rocm":  # the same GEMV, parameterised for the wavefront
        from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS

        return tuple(range(2, MAX_ROWS + 1))
    return ()


def norm_bias_selector(target: Target) -> Callable[[int, str], tirx.PrimFunc] | None:
    """GPU kernel for the norm-bias row dot `s[b] = sum_i x[b, i] * weight_bias[i]` (fp32 out), or None to let
    the relax pipeline schedule a plain reduction (llvm). dlight's schedule of that reduction keeps whole rows
    in static shared memory, which fails for static batches >= 2 at 7B shapes."""
    if target.kind.name not in ("cuda", "rocm"):  # rocm: 256 threads, TVM's allreduce follows the wavefront
        return None
    from vptq_mlc.tir_kernels.cuda_gemv import row_dot_cuda

    @functools.lru_cache(maxsize=None)
    def select(in_features: int, dtype: str) -> tirx.PrimFunc:
        return row_dot_cuda(in_features, dtype).with_attr("op_pattern", OP_PATTERN_OPAQUE).with_attr(
            "tirx.is_scheduled", True)

    return select

