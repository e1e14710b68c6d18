"""VQ kernel families and what each picks per (layer config, static row count): which kernel runs, and therefore
which operands (tensor-cache entries) a layer must declare. The target backend (compile/cuda.py, rocm.py, cpu.py)
says which family it builds with; nothing here looks at the target's kind.

- `CpuKernelSelector` (llvm): the generic TE kernel with its CPU schedule. The base `KernelSelector`: the generic
  kernel unscheduled (targets without hand-scheduled kernels).
- `WavefrontKernelSelector` (rocm): static row counts 1..8 -> the VQ-GEMV (`cuda_gemv.py`) with the target's
  parameters (`cuda_gemv.wavefront_params`: wavefront 64 on CDNA / 32 on RDNA, static LDS, 256 threads); other row
  counts -> the dlight dequant matmul (`cuda_prefill.py`, same Matmul rule and config as on CUDA), or, for fp16 on
  CDNA with ROCM_MFMA_ENV=1, dequantize into a scratch fp16 weight + the MFMA GEMM (`rocm_dense_mfma.py`);
  norm-bias row dot as on CUDA. Built and inspected here, never run on AMD hardware.
- `CudaKernelSelector`: static row counts 1..2 for layers whose codebooks do not fit shared memory (K = 65536
  class), when the model dir carries the `code-sorted` layout and the slices are balanced (`code_sorted_preferred`:
  no residual or Kr == K) -> `cuda_code_sorted.py` (slice-per-CTA kernel + a reduce kernel);
  static rows 6..16 (fp16; 9..16 with a residual codebook or v > 8: `cuda_mma.mma_preferred`, but 6..16 for residual
  books in shared memory of v = 8 layers: `cuda_mma_wide.residual_rows_preferred`) -> tensor-core
  kernel: `cuda_mma_wide.py` for v = 8 layers whose codes region is whole 32-column chunks (VPTQ_MLC_MMA_WIDE=0 at
  compile time: `cuda_mma.py` for those too; its A fragments built in registers for launches of >= 8192
  outputs, `register_tiles_preferred`, unless VPTQ_MLC_REGISTER_TILES=0),
  `cuda_mma.py` for the others; other static row counts 1..8 (decode) ->
  hand-scheduled VQ-GEMV (`cuda_gemv.py`); other row counts (prefill, symbolic batch) -> for fp16, one PrimFunc
  choosing by the run-time row count (`cuda_dequant_gemm.py`): the tensor-core kernel with 4 row tiles per CTA
  below DEQUANT_GEMM_FROM_ROWS, else dequantize the layer into a scratch fp16 weight + the dense tensor-core GEMM
  (`cuda_dense_mma.py`); for fp32 models, the dequantize-in-shared-memory matmul scheduled by dlight
  (`cuda_prefill.py`).
  GPU kernels carry `op_pattern = kOpaque` so Relax FuseOps never fuses them with neighbours (fusing a
  call_tir kernel failed in FuseTIR with "Inconsistent buffers y and lv.. mapped to the same relax var", and
  a fused function would lose our schedule), and `tirx.is_scheduled` so dlight leaves them alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvm import tirx
from tvm.target import Target

from vptq_mlc.artifact.vq_layout import (
    CODE_SORTED,
    LAYOUT,
    Shapes,
    code_sorted_eligible,
    code_sorted_shapes,
    vq_operand_shapes,
)
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import compile_switch
from vptq_mlc.tir_kernels.generic import (
    gathered_row_dot,
    schedule_cpu,
    schedule_gathered_cpu,
    vq_gathered_generic,
    vq_matmul_generic,
)

if TYPE_CHECKING:
    from vptq_mlc.tir_kernels.cuda_gemv import GpuParams
    from vptq_mlc.tir_kernels.fused_input import FusedInput

OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque
# static decode batches above the GEMV's MAX_ROWS that only the tensor-core kernel (cuda_mma.py) serves
CUDA_MMA_ONLY_BATCHES = (12, 16)


@dataclass(frozen=True)
class VQKernel:
    """One kernel call: `func(xs, *operands, *scratch outputs, y)`. Scratch outputs (fp32 partial sums, or a
    dequantized fp16 weight) are extra results of the call_tir that the caller discards; Relax plans their memory
    like any intermediate."""

    func: tirx.PrimFunc
    operands: tuple[str, ...]
    scratch: tuple[tuple[tuple[int, ...], str], ...] = ()
    # > 0: a folded prefill kernel (`KernelSelector.folded`): `func(x, xs, dot, *operands, *scratch, y)` with the
    # norm-bias dot and the bias in y, reading xs / dot (the prologue's) only below this many rows
    fold_from_rows: int = 0


@dataclass(frozen=True)
class VQGroupKernel:
    """One call for several layers of one config reading the same x, their outputs side by side in one y:
    `func(x, per layer m: xs_m, dot_m, *operands[m], *scratch, y)` (`KernelSelector.folded_group`)."""

    func: tirx.PrimFunc
    operands: tuple[tuple[str, ...], ...]
    scratch: tuple[tuple[tuple[int, ...], str], ...]
    fold_from_rows: int


# The fused decode GEMV (prologue, RMSNorm, silu * up and residual adds folded into the VQ GEMV) is off unless asked
# for (compile with VPTQ_MLC_FUSED_DECODE=1) until its kernels have run on a GPU; off, CUDA libraries get the shared
# prologue + GEMV launches whose numerics the GPU check suite has verified.
FUSED_DECODE_ENV = "VPTQ_MLC_FUSED_DECODE"
FUSED_DECODE_DEFAULT = False


def fused_decode_enabled() -> bool:
    """Whether CUDA decode layers get the fused GEMV (`CudaKernelSelector._pick_fused`): FUSED_DECODE_ENV=1 / 0,
    else FUSED_DECODE_DEFAULT."""
    return compile_switch(FUSED_DECODE_ENV, FUSED_DECODE_DEFAULT, "the fused decode GEMV")


# The same folding as two launches per linear: a prologue kernel that also computes the neighbour (RMSNorm, silu * up)
# and writes xs / dot, then the GEMV adding the dot (and the residual) in its epilogue, q/k/v side by side
# (`cuda_gemv.vq_gemv_cuda(..., two_launch=True)`): the launches the one-launch form saves, without each CTA
# preparing the whole activation again. On by default (one H100 run, Llama-2-7B shape v8-k4096-0 batch 1: 562 -> 402
# launches, 2804 us of kernels per step, 1.01x tok/s end to end; its check-suite cases correct, a tiny model's greedy
# tokens equal to the CPU library's); VPTQ_MLC_TWO_LAUNCH_DECODE=0 keeps the separate kernels. The one-launch form
# wins where both are on and it fits.
TWO_LAUNCH_DECODE_ENV = "VPTQ_MLC_TWO_LAUNCH_DECODE"
TWO_LAUNCH_DECODE_DEFAULT = True


def two_launch_decode_enabled() -> bool:
    """Whether CUDA decode layers get the two-launch form of the fused GEMV: TWO_LAUNCH_DECODE_ENV=1 / 0, else
    TWO_LAUNCH_DECODE_DEFAULT."""
    return compile_switch(TWO_LAUNCH_DECODE_ENV, TWO_LAUNCH_DECODE_DEFAULT,
                          "prologue kernels with the RMSNorm / silu * up, GEMVs adding the dot and residual")


# The two-launch decode linear at the tensor-core decode rows (`cuda_mma_wide.vq_mma_wide_cuda(..., prologue=...)`):
# the prologue kernel computes the RMSNorm / silu * up too, and the tensor-core kernel adds the norm-bias dot and the
# residual and writes q/k/v side by side, so the RMSNorm, silu * up, add and concatenation kernels around those
# linears go away. On by default (H100, Llama-2-7B shape v8-k4096-0 at 16 rows, one run: 688 -> 400 launches per
# step, 1.033x tok/s; every check-suite case correct); VPTQ_MLC_TWO_LAUNCH_MMA=0 keeps the separate kernels.
TWO_LAUNCH_MMA_ENV = "VPTQ_MLC_TWO_LAUNCH_MMA"
TWO_LAUNCH_MMA_DEFAULT = True


def two_launch_mma_enabled() -> bool:
    """Whether CUDA decode layers at the tensor-core rows get the two-launch form of `cuda_mma_wide`:
    TWO_LAUNCH_MMA_ENV=1 / 0, else TWO_LAUNCH_MMA_DEFAULT."""
    return compile_switch(TWO_LAUNCH_MMA_ENV, TWO_LAUNCH_MMA_DEFAULT,
                          "the two-launch form of the tensor-core decode linears")


# The long-prompt prefill of normed fp16 VQ layers with the activation prologue folded into the dequantized weight
# (`cuda_dequant_gemm.vq_prefill_folded_cuda`): on by default (one H100 run, Llama-2-7B shape v8-k4096-0 on the
# mma.sync GEMM: 2047-token prefill 1.17x, 512 tokens 1.04x, its check-suite cases correct; decode kernels
# structurally identical). VPTQ_MLC_PREFILL_FOLD=0 keeps prologue + dequantize + GEMM + `y + dot`.
PREFILL_FOLD_ENV = "VPTQ_MLC_PREFILL_FOLD"
PREFILL_FOLD_DEFAULT = True


def prefill_fold_enabled() -> bool:
    """Whether CUDA prefill of normed fp16 VQ layers folds the prologue (`CudaKernelSelector._pick_folded`):
    PREFILL_FOLD_ENV=1 / 0, else PREFILL_FOLD_DEFAULT."""
    return compile_switch(PREFILL_FOLD_ENV, PREFILL_FOLD_DEFAULT, "the prologue folded into long-prompt prefill")


# Fewer prefill launches around the folded kernels: normed fp16 layers of one config that read the same activation
# (q/k/v, gate/up) as ONE folded call (`cuda_dequant_gemm.vq_prefill_folded_group_cuda`: each layer's folding
# dequantize into one scratch, one GEMM over all outputs, written side by side: no concatenation afterwards), and
# o_proj / down_proj adding the residual in their epilogues (no `x + y` pass). On by default (H100: every check-suite
# case of the group and residual kernels correct; a 512-token prefill 565 instead of 757 launches, -1.05 ms of
# kernels); VPTQ_MLC_PREFILL_GROUP=0 keeps one folded call per layer and the adds.
PREFILL_GROUP_ENV = "VPTQ_MLC_PREFILL_GROUP"
PREFILL_GROUP_DEFAULT = True


def prefill_group_enabled() -> bool:
    """Whether CUDA prefill runs q/k/v and gate/up as one folded group call and folds the residual adds into o_proj
    and down_proj: PREFILL_GROUP_ENV=1 / 0, else PREFILL_GROUP_DEFAULT (the folded prefill itself must be on)."""
    return compile_switch(PREFILL_GROUP_ENV, PREFILL_GROUP_DEFAULT, "one folded prefill call for q/k/v and gate/up")


# ROCm's matrix-core (MFMA) GEMM for symbolic-row fp16 matmuls on CDNA (`rocm_dense_mfma.py`) is off unless asked for
# (compile with VPTQ_MLC_ROCM_MFMA=1): no AMD GPU has run it; off, ROCm libraries keep the SIMT kernels.
ROCM_MFMA_ENV = "VPTQ_MLC_ROCM_MFMA"
ROCM_MFMA_DEFAULT = False


def rocm_mfma_enabled() -> bool:
    """Whether ROCm builds for MFMA archs use the MFMA GEMM: ROCM_MFMA_ENV=1 / 0, else ROCM_MFMA_DEFAULT."""
    return compile_switch(ROCM_MFMA_ENV, ROCM_MFMA_DEFAULT, "the ROCm MFMA GEMM for fp16 prefill")


class KernelSelector:
    """`select(cfg, dtype, rows) -> VQKernel` for one target, plus `operand_shapes(cfg, dtype)`: every operand any
    of the target's kernels reads (what VPTQLinear declares as parameters). Cached, so identical layers share one
    PrimFunc in the library. This base picks the generic TE kernel (targets without hand-scheduled kernels); each
    subclass is one kernel family, and the target backend (compile/cuda.py, rocm.py, cpu.py) names its family."""

    def __init__(self, target: Target, layouts: Iterable[str] = (LAYOUT,)):
        self.target = target
        self.layouts = frozenset(layouts)
        self.codebook_dtype: str | None = None  # codebooks stored narrower than the model (CPU only; compile sets it)
        self._select = functools.lru_cache(maxsize=None)(self._pick)
        self._select_shared = functools.lru_cache(maxsize=None)(self._pick_shared)
        self._select_fused = functools.lru_cache(maxsize=None)(self._pick_fused)
        self._select_folded = functools.lru_cache(maxsize=None)(self._pick_folded)
        self._select_folded_group = functools.lru_cache(maxsize=None)(self._pick_folded_group)

    def uses_code_sorted(self, cfg: VPTQLayerConfig, dtype: str) -> bool:
        """Whether the layer's code-sorted entries are declared (loaded onto the device); only CUDA reads them."""
        return False

    def operand_shapes(self, cfg: VPTQLayerConfig, dtype: str) -> Shapes:
        shapes = dict(vq_operand_shapes(cfg))
        if self.uses_code_sorted(cfg, dtype):
            shapes.update(code_sorted_shapes(cfg, dtype))
        return shapes

    def __call__(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> VQKernel:
        return self._select(cfg, dtype, rows)

    def shared(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None, count: int) -> VQKernel | None:
        """One launch for `count` layers of config `cfg` reading `rows` activation rows each:
        `func(xs_0, *operands_0, xs_1, *operands_1, .., y_0, y_1, ..)`, or None where this family has no such
        kernel (then each layer gets its own). Cached like the single-layer choice."""
        return self._select_shared(cfg, dtype, rows, count)

    def _pick_shared(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None, count: int) -> VQKernel | None:
        return None

    def fused(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None, perms: tuple[bool, ...],
              opts: FusedInput | None = None) -> VQKernel | None:
        """One launch that prepares the activation itself and runs the VQ kernel, for `len(perms)` normed layers
        of config `cfg` reading the same `rows` activation rows (`perms[m]`: layer m has a permutation):
        `func(x, [x2], [gamma], per layer m: [perm_m], col_scale_m, weight_bias_m, *operands_m, [residual], then
        y_0, y_1, ..)` with the norm-bias dot included in y (`opts`: which neighbours it computes too, see
        `cuda_gemv.FusedInput`), or None where this family has none (then the prologue kernel runs first)."""
        return self._select_fused(cfg, dtype, rows, perms, opts)

    def _pick_fused(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None, perms: tuple[bool, ...],
                    opts: FusedInput | None) -> VQKernel | None:
        return None

    def folded(self, cfg: VPTQLayerConfig, dtype: str, has_bias: bool, residual: bool = False) -> VQKernel | None:
        """The whole linear of a normed layer for a symbolic row count with its activation prologue folded into
        the kernel for long prompts: `func(x, xs, dot, *operands, *scratch, y)` (`VQKernel.fold_from_rows`; with
        `residual` the last operand is residual[n, O], added to y), or None where this family has none (then
        prologue + VQ kernel + the adds). Cached."""
        return self._select_folded(cfg, dtype, has_bias, residual)

    def _pick_folded(self, cfg: VPTQLayerConfig, dtype: str, has_bias: bool, residual: bool) -> VQKernel | None:
        return None

    def folded_group(self, cfg: VPTQLayerConfig, dtype: str, perms: tuple[bool, ...]) -> VQGroupKernel | None:
        """`folded` for `len(perms)` normed layers of config `cfg` without bias reading the same x (`perms[m]`:
        layer m has a permutation), their outputs side by side in one y, or None where this family has none (then
        each layer's own folded call, and a concatenation where the caller needs one). Cached."""
        return self._select_folded_group(cfg, dtype, perms)

    def _pick_folded_group(self, cfg: VPTQLayerConfig, dtype: str, perms: tuple[bool, ...]) -> VQGroupKernel | None:
        return None

    def _pick(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> VQKernel:
        return VQKernel(vq_matmul_generic(cfg, dtype), tuple(vq_operand_shapes(cfg)))

    @functools.cache  # noqa: B019 - one selector per compile; identical stacks share one PrimFunc
    def gathered(self, cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int) -> VQKernel:
        """The gathered-matrices kernel `func(xs[n, slots, I], mat[n, slots], *stacked operands, y[n, slots, O])`
        over `matrices` stacked layers of config `cfg` (artifact/expert_stack.py). n is symbolic: decode and
        prefill calls share one PrimFunc."""
        return VQKernel(self._gathered(cfg, dtype, matrices, slots), tuple(vq_operand_shapes(cfg)))

    def _gathered(self, cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int) -> tirx.PrimFunc:
        return vq_gathered_generic(cfg, dtype, matrices, slots, None, self.codebook_dtype)

    @functools.cache  # noqa: B019 - as `gathered`
    def gathered_row_dot(self, in_features: int, dtype: str, slots: int, shared: bool, matrices: int
                         ) -> tirx.PrimFunc:
        """`s[b, t] = x[b, t or 0] . w[mat[b, t]]` (fp32): the norm-bias term of gathered linears
        (`generic.gathered_row_dot`), scheduled by the pipeline (dlight on GPUs: its schedule matches transformers
        on the H100, where a hand-scheduled one binding the reduction to threads did not)."""
        return gathered_row_dot(in_features, dtype, slots, shared, matrices)


class CpuKernelSelector(KernelSelector):
    """The generic TE kernel with its CPU schedule."""

    def _gathered(self, cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int) -> tirx.PrimFunc:
        return schedule_gathered_cpu(vq_gathered_generic(cfg, dtype, matrices, slots, None, self.codebook_dtype))

    def _pick(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> VQKernel:
        # a static row count (decode) keeps the accumulators in registers; a symbolic one needs memory
        return VQKernel(schedule_cpu(vq_matmul_generic(cfg, dtype, rows, self.codebook_dtype), rows),
                        tuple(vq_operand_shapes(cfg)))


class WavefrontKernelSelector(KernelSelector):
    """The CUDA GEMV parameterised for another GPU (`params`: wavefront, static LDS, threads) for decode row counts
    1..MAX_ROWS, else the dlight dequant matmul (as fp32 models on CUDA). What ROCm builds. `mfma`: fp16 layers'
    symbolic rows dequantize into a scratch weight for the MFMA GEMM instead (CDNA only)."""

    def __init__(self, target: Target, params: GpuParams, layouts: Iterable[str] = (LAYOUT,), mfma: bool = False):
        super().__init__(target, layouts)
        self.params = params
        self.mfma = mfma

    def _pick(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> VQKernel:
        from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS, vq_gemv_cuda
        from vptq_mlc.tir_kernels.cuda_prefill import dequant_matmul_cuda

        generic_ops = tuple(vq_operand_shapes(cfg))
        if rows is not None and 1 <= rows <= MAX_ROWS:
            return _mark(VQKernel(vq_gemv_cuda(cfg, dtype, rows, params=self.params), generic_ops))
        if rows is None and self.mfma:
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import dequant_gemm_supported, vq_prefill_cuda
            from vptq_mlc.tir_kernels.rocm_dense_mfma import mfma_supported, vq_gemm_macros

            if mfma_supported(cfg.out_features, cfg.in_features, dtype) and dequant_gemm_supported(cfg, dtype):
                # every row count dequantizes (the CUDA tensor-core VQ kernel for short prompts has no ROCm form)
                func, scratch = vq_prefill_cuda(cfg, dtype, from_rows=0, gemms=vq_gemm_macros)
                return _mark(VQKernel(func, generic_ops, scratch))
        return _mark(VQKernel(dequant_matmul_cuda(cfg, dtype, self.target), generic_ops))

    def _gathered(self, cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int) -> tirx.PrimFunc:
        from vptq_mlc.tir_kernels.cuda_gather import vq_gathered_cuda

        return _mark(VQKernel(vq_gathered_cuda(cfg, dtype, matrices, slots, params=self.params), ())).func


class CudaKernelSelector(KernelSelector):
    """Code-sorted, tensor-core, GEMV and prefill kernels, by row count (module docstring)."""

    def uses_code_sorted(self, cfg: VPTQLayerConfig, dtype: str) -> bool:
        """The layer has code-sorted entries and some decode row count takes the code-sorted kernel (else its
        entries are not declared, so they are never loaded onto the GPU)."""
        if CODE_SORTED not in self.layouts or not code_sorted_eligible(cfg, dtype):
            return False
        from vptq_mlc.tir_kernels.cuda_code_sorted import code_sorted_preferred

        return code_sorted_preferred(cfg, dtype, 1)

    def _decode_family(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> str | None:
        """"code-sorted", "mma" or "gemv" for a static decode row count; None for symbolic rows (prefill)."""
        from vptq_mlc.tir_kernels import cuda_code_sorted as cs
        from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS
        from vptq_mlc.tir_kernels.cuda_mma import mma_preferred
        from vptq_mlc.tir_kernels.cuda_mma_wide import residual_rows_preferred

        decode = rows is not None and 1 <= rows
        if decode and rows <= cs.MAX_ROWS and self.uses_code_sorted(cfg, dtype):
            return "code-sorted"
        # fp16, rows 6..16 (a residual book: 9..16, or 6..16 where the whole-entry kernel reads both from shared memory)
        if decode and (mma_preferred(cfg, dtype, rows, MAX_ROWS) or residual_rows_preferred(cfg, dtype, rows)):
            return "mma"
        if decode and rows <= MAX_ROWS:
            return "gemv"
        return None

    def _pick_shared(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None, count: int) -> VQKernel | None:
        """Where the layers' own kernel is the GEMV: the GEMV over `count` layers in one launch (each CTA does what
        it does in its layer's own launch: the same bits); at the tensor-core decode rows, the whole-entry kernel
        with register fragments over `count` layers where `register_tiles_preferred` says so."""
        from vptq_mlc.tir_kernels.cuda_gemv import MAX_LAYERS, vq_gemv_cuda
        from vptq_mlc.tir_kernels.cuda_mma_wide import (
            mma_wide_enabled,
            plan_mma_wide,
            register_tiles_preferred,
            vq_mma_wide_cuda,
        )

        family = self._decode_family(cfg, dtype, rows)
        if not 2 <= count <= MAX_LAYERS:
            return None
        if family == "mma" and mma_wide_enabled() and register_tiles_preferred(cfg, dtype, rows, count):
            plan = plan_mma_wide(cfg, rows, register_tiles=True, count=count)
            return _mark(VQKernel(vq_mma_wide_cuda(cfg, dtype, rows, plan, count), tuple(vq_operand_shapes(cfg))))
        if family != "gemv":
            return None
        return _mark(VQKernel(vq_gemv_cuda(cfg, dtype, rows, count=count), tuple(vq_operand_shapes(cfg))))

    def _pick_fused(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None, perms: tuple[bool, ...],
                    opts: FusedInput | None) -> VQKernel | None:
        """Where the layers' own kernel is the GEMV: the GEMV with the prologue folded in (`vq_gemv_cuda(...,
        prologue=perms, fused=opts)`, where the activation rows fit its shared memory), or its two-launch form
        (`two_launch=True`: the prologue kernel's xs / dot as scratch outputs), as the switches say. At the
        tensor-core rows: the two-launch form of the whole-entry kernel (`_pick_fused_mma`)."""
        from vptq_mlc.tir_kernels.cuda_gemv import MAX_LAYERS, fused_prologue_fits, two_launch_scratch, vq_gemv_cuda
        from vptq_mlc.tir_kernels.fused_input import FusedInput

        opts = opts or FusedInput()
        one, two = fused_decode_enabled(), two_launch_decode_enabled()
        if not 1 <= len(perms) <= MAX_LAYERS or not cfg.enable_norm or (opts.residual and len(perms) != 1):
            return None
        family = self._decode_family(cfg, dtype, rows)
        if family == "mma":
            return self._pick_fused_mma(cfg, dtype, rows, perms, opts)
        if not (one or two) or family != "gemv":
            return None
        if one and fused_prologue_fits(cfg, rows, dtype):
            return _mark(VQKernel(vq_gemv_cuda(cfg, dtype, rows, prologue=perms, fused=opts),
                                  tuple(vq_operand_shapes(cfg))))
        if not two:
            return None
        return _mark(VQKernel(vq_gemv_cuda(cfg, dtype, rows, prologue=perms, fused=opts, two_launch=True),
                              tuple(vq_operand_shapes(cfg)),
                              two_launch_scratch(cfg.in_features, dtype, rows, len(perms))))

    def _pick_fused_mma(self, cfg: VPTQLayerConfig, dtype: str, rows: int, perms: tuple[bool, ...],
                        opts: FusedInput) -> VQKernel | None:
        """The two-launch form of the whole-entry tensor-core kernel for `perms` layers in one launch, with the
        layers' own plan (register fragments where `register_tiles_preferred` says so, else the tile form; several
        layers only with register fragments, as `_pick_shared`), or None: the switches off, no whole-entry form, or
        a book read through L1/L2 (K = 65536: the two-launch form with q/k/v and gate/up in one tile-form launch
        each was 0.94x the separate kernels at 16 rows on the H100, bench/RESULTS.md "Session 17")."""
        from vptq_mlc.tir_kernels.cuda_mma_wide import (
            cta_splits_preferred,
            mma_wide_enabled,
            mma_wide_supported,
            plan_cta_splits,
            plan_mma_wide,
            register_tiles_preferred,
            two_launch_scratch_mma,
            vq_mma_wide_cuda,
        )

        count = len(perms)
        if not (two_launch_mma_enabled() and mma_wide_enabled() and mma_wide_supported(cfg, dtype, rows)):
            return None
        reg = register_tiles_preferred(cfg, dtype, rows, count)
        if count == 1 and cta_splits_preferred(cfg, dtype, rows):  # o_proj, down_proj: register fragments too
            plan = plan_cta_splits(cfg, rows)
        else:
            plan = plan_mma_wide(cfg, rows, reg, count)
        if not plan.smem_codebook or (count > 1 and not reg):
            return None
        return _mark(VQKernel(vq_mma_wide_cuda(cfg, dtype, rows, plan, prologue=perms, fused=opts),
                              tuple(vq_operand_shapes(cfg)), two_launch_scratch_mma(cfg, dtype, rows, plan, count)))

    def _pick_folded(self, cfg: VPTQLayerConfig, dtype: str, has_bias: bool, residual: bool) -> VQKernel | None:
        """Normed fp16 layers the dequantize + GEMM path serves (`cuda_dequant_gemm.fold_supported`), with the
        switch on: `vq_prefill_folded_cuda` (the residual added in its epilogues only with the residual switch)."""
        from vptq_mlc.tir_kernels.cuda_dequant_gemm import (
            DEQUANT_GEMM_FROM_ROWS,
            fold_supported,
            vq_prefill_folded_cuda,
        )
        from vptq_mlc.tir_kernels.cuda_wgmma import wgmma_for_target

        if not prefill_fold_enabled() or not fold_supported(cfg, dtype) or (residual and not prefill_group_enabled()):
            return None
        func, operands, scratch = vq_prefill_folded_cuda(cfg, dtype, has_bias, wgmma=wgmma_for_target(self.target),
                                                         residual=residual)
        return _mark(VQKernel(func, operands, scratch, DEQUANT_GEMM_FROM_ROWS))

    def _pick_folded_group(self, cfg: VPTQLayerConfig, dtype: str, perms: tuple[bool, ...]) -> VQGroupKernel | None:
        """Groups of 2..3 layers `_pick_folded` serves (without bias), with the group switch on:
        `vq_prefill_folded_group_cuda`."""
        from vptq_mlc.tir_kernels.cuda_dequant_gemm import (
            DEQUANT_GEMM_FROM_ROWS,
            MAX_GROUP_LAYERS,
            fold_supported,
            vq_prefill_folded_group_cuda,
        )
        from vptq_mlc.tir_kernels.cuda_wgmma import wgmma_for_target

        if not (prefill_group_enabled() and prefill_fold_enabled() and fold_supported(cfg, dtype)) or \
                not 2 <= len(perms) <= MAX_GROUP_LAYERS or cfg.bias:
            return None
        func, operands, scratch = vq_prefill_folded_group_cuda(cfg, dtype, perms,
                                                               wgmma=wgmma_for_target(self.target))
        return VQGroupKernel(_opaque(func), operands, scratch, DEQUANT_GEMM_FROM_ROWS)

    def _pick(self, cfg: VPTQLayerConfig, dtype: str, rows: int | None) -> VQKernel:
        from vptq_mlc.tir_kernels import cuda_code_sorted as cs
        from vptq_mlc.tir_kernels.cuda_gemv import vq_gemv_cuda
        from vptq_mlc.tir_kernels.cuda_mma import vq_mma_cuda
        from vptq_mlc.tir_kernels.cuda_prefill import dequant_matmul_cuda

        generic_ops = tuple(vq_operand_shapes(cfg))
        family = self._decode_family(cfg, dtype, rows)
        if family == "code-sorted":
            k = VQKernel(cs.vq_code_sorted_cuda(cfg, dtype, rows), cs.code_sorted_operands(cfg, dtype),
                         ((cs.code_sorted_scratch(cfg, dtype, rows), "float32"),))
        elif family == "mma":
            from vptq_mlc.tir_kernels.cuda_mma_wide import (
                mma_wide_enabled,
                mma_wide_supported,
                plan_mma_wide,
                register_tiles_preferred,
                vq_mma_wide_cuda,
            )

            if mma_wide_enabled() and mma_wide_supported(cfg, dtype, rows):  # v = 8, unless VPTQ_MLC_MMA_WIDE=0
                plan = plan_mma_wide(cfg, rows, register_tiles_preferred(cfg, dtype, rows))
                k = VQKernel(vq_mma_wide_cuda(cfg, dtype, rows, plan), generic_ops)
            else:
                k = VQKernel(vq_mma_cuda(cfg, dtype, rows), generic_ops)
        elif family == "gemv":
            k = VQKernel(vq_gemv_cuda(cfg, dtype, rows), generic_ops)
        elif rows is None and dtype == "float16":  # prefill / symbolic batch: VQ MMA, or dequantize + dense MMA
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_prefill_cuda
            from vptq_mlc.tir_kernels.cuda_wgmma import wgmma_for_target

            # scratch: the layer's fp16 weight (long prompts)
            func, scratch = vq_prefill_cuda(cfg, dtype, wgmma=wgmma_for_target(self.target))
            k = VQKernel(func, generic_ops, scratch)
        else:
            k = VQKernel(dequant_matmul_cuda(cfg, dtype, self.target), generic_ops)
        return _mark(k)

    def _gathered(self, cfg: VPTQLayerConfig, dtype: str, matrices: int, slots: int) -> tirx.PrimFunc:
        from vptq_mlc.tir_kernels.cuda_gather import vq_gathered_cuda

        return _mark(VQKernel(vq_gathered_cuda(cfg, dtype, matrices, slots), ())).func


def _opaque(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """A hand-scheduled GPU kernel: opaque to FuseOps, skipped by dlight."""
    return func.with_attr("op_pattern", OP_PATTERN_OPAQUE).with_attr("tirx.is_scheduled", True)


def _mark(k: VQKernel) -> VQKernel:
    return VQKernel(_opaque(k.func), k.operands, k.scratch, k.fold_from_rows)


def gemv_decode_batches() -> tuple[int, ...]:
    """Static decode batch sizes the GEMV serves (2..MAX_ROWS; 1 is the plain `decode`). The norm-bias row dot has
    its own kernel (`norm_bias_kernels`), since dlight's reduction schedule for static batches overflowed shared
    memory."""
    from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS

    return tuple(range(2, MAX_ROWS + 1))


@dataclass(frozen=True)
class NormBiasKernels:
    """How a normed layer's activation side runs on a GPU target: the fp32 norm-bias row dot
    `s[b] = sum_i x[b, i] * weight_bias[i]`, and where available one prologue kernel that also writes
    `xs = x[:, perm] * col_scale` (so the layer is prologue + VQ kernel instead of gather + row dot + VQ kernel),
    and one prologue launch for up to `max_shared` linears that read the same activation (q/k/v, gate/up)."""

    row_dot: Callable[[int, str], tirx.PrimFunc]
    # (in_features, dtype, has_perm[, below_rows: launch only below that many rows, 0 = always])
    prologue: Callable[..., tirx.PrimFunc] | None = None
    # (in_features, dtype, has_perm per linear[, below_rows]) -> one kernel writing every linear's xs and dot
    shared_prologue: Callable[..., tirx.PrimFunc] | None = None
    max_shared: int = 1


def norm_bias_kernels(prologue: bool) -> NormBiasKernels:
    """GPU kernels for the norm-bias term (targets without them let the relax pipeline schedule a plain reduction).
    dlight's schedule of that reduction keeps whole rows in static shared memory, which fails for static batches
    >= 2 at 7B shapes. `prologue`: also the fused prologue (`cuda_prologue.py`, 32-lane warp shuffles: CUDA);
    without it the row dot alone (256 threads; TVM's allreduce follows the wavefront: ROCm). With the prologue comes
    its shared form: linears reading the same activation (q/k/v, gate/up) get one launch instead of one each."""
    from vptq_mlc.tir_kernels.cuda_gemv import row_dot_cuda

    def mark(f: tirx.PrimFunc) -> tirx.PrimFunc:
        return f.with_attr("op_pattern", OP_PATTERN_OPAQUE).with_attr("tirx.is_scheduled", True)

    @functools.cache
    def row_dot(in_features: int, dtype: str) -> tirx.PrimFunc:
        return mark(row_dot_cuda(in_features, dtype))

    if not prologue:
        return NormBiasKernels(row_dot)
    from vptq_mlc.tir_kernels.cuda_prologue import MAX_SHARED, vq_prologue_cuda, vq_shared_prologue_cuda

    @functools.cache
    def prologue_kernel(in_features: int, dtype: str, has_perm: bool, below_rows: int = 0) -> tirx.PrimFunc:
        return mark(vq_prologue_cuda(in_features, dtype, has_perm, below_rows))

    @functools.cache
    def shared_prologue_kernel(in_features: int, dtype: str, perms: tuple[bool, ...], below_rows: int = 0
                               ) -> tirx.PrimFunc:
        return mark(vq_shared_prologue_cuda(in_features, dtype, perms, below_rows))

    return NormBiasKernels(row_dot, prologue_kernel, shared_prologue_kernel, MAX_SHARED)
