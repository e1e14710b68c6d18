"""Per-kernel checks and timings of our CUDA VQ kernels, split by where each half runs.

Build box (TVM compiler, nvcc, no GPU): `build_kernel_library(cases, out_dir)` compiles every case's kernel
(the one the CUDA backend's kernel selector picks) into one library + `kernels.json`.
GPU host (runtime-only TVM + torch): `check_kernels` compares each kernel, wrapped exactly like VPTQLinear
(permute/scale the activation, add the norm-bias dot and the bias), with `x @ dequantize(W).T + bias`, where
`dequantize` is the spec reference; `time_kernels` times them against torch fp16 matmul with a cold L2
(a buffer larger than L2 is READ before every call: docs/vq-gemv-h100.md §0).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "kernels.json"
LIBRARY = "kernels_cuda.so"

# the variants issue 10 asks for, and the real shapes (out x in)
BENCH_VARIANTS = ("v8-k256-256", "v8-k4096-0", "v8-k65536-0", "v8-k65536-256", "v12-k65536-4096", "v16-k65536-65536")
BENCH_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
RMSNORM_EPS = 1e-5  # the fused RMSNorm cases' epsilon (Llama 2's)


@dataclass(frozen=True)
class KernelCase:
    variant: str
    in_features: int
    out_features: int
    rows: int | None  # static rows (decode kernel) or None (symbolic: prefill kernel)
    layer: dict[str, Any] = field(default_factory=dict)  # extra VPTQLayerConfig.from_variant kwargs
    run_rows: int = 0  # rows to run a symbolic kernel with (0 = `rows`)
    # GemvPlan overrides (schedule sweeps, decode); with kernel "dequant-gemm": the DequantPlan fields
    plan: dict[str, Any] = field(default_factory=dict)
    # "" = the registry's choice; "gemv" / "mma" / "mma-wide" / "code-sorted" / "dequant" (dlight) force a kernel;
    # "dequant-gemm": dequantize into a scratch weight + the dense GEMM at every row count (symbolic rows);
    # "fold": the folded prefill of a normed layer (`vq_prefill_folded_cuda`; plan {"from_rows": N} its threshold);
    # "fold-group": the folded prefill of the `prologue` linears (one letter each) writing one y side by side
    # (`vq_prefill_folded_group_cuda`), after their gated shared prologue
    kernel: str = ""
    # the activation side through our prologue kernel(s) instead of torch's gather: one letter per linear reading
    # the same x, "p" with a permutation, "n" without ("p": the layer's own prologue; "ppp": the shared prologue of
    # three linears, each with its own random perm / norm scale / norm bias); "" = torch computes xs and the dot
    prologue: str = ""
    # the fused GEMV's neighbours (prologue cases): comma-separated "rmsnorm" / "swiglu", "residual", "concat"
    fused: str = ""

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in sorted(self.layer.items()))
        r = f"r{self.rows}" if self.rows else f"rdyn{self.run_rows}"
        plan = "".join(f"-{k[0]}{v}" for k, v in sorted(self.plan.items()))
        forced = f"-{self.kernel}" if self.kernel else ""
        pro = f"-prologue_{self.prologue}" if self.prologue else ""
        pro += f"-fused_{self.fused.replace(',', '_')}" if self.fused else ""
        return f"{self.variant}-{self.out_features}x{self.in_features}-{r}{extra}{plan}{forced}{pro}"

    def fused_input(self):
        """The fused GEMV's `FusedInput` for this case (RMSNorm epsilon 1e-5)."""
        from vptq_mlc.tir_kernels.fused_input import FusedInput

        parts = set(filter(None, self.fused.split(",")))
        source = "rmsnorm" if "rmsnorm" in parts else "swiglu" if "swiglu" in parts else "x"
        return FusedInput(source, RMSNORM_EPS if source == "rmsnorm" else 0.0, "residual" in parts, "concat" in parts)

    def config(self):
        from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

        return VPTQLayerConfig.from_variant(self.variant, self.in_features, self.out_features, **self.layer)

    def member_configs(self) -> list:
        """The configs of the linears of a prologue case (normed; perm per letter of `prologue`)."""
        from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

        return [VPTQLayerConfig.from_variant(self.variant, self.in_features, self.out_features,
                                             **{**self.layer, "enable_norm": True, "enable_perm": ch == "p"})
                for ch in self.prologue]

    def n(self) -> int:
        return self.rows or self.run_rows


def correctness_cases() -> list[KernelCase]:
    """Every variant family, residual, outliers, perm/norm on and off, odd shapes, decode rows 1/2/8, prefill."""
    outl = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
    cases = []
    for var in ("v8-k256-0", "v8-k256-256", "v8-k4096-0", "v8-k8192-0", "v8-k65536-0", "v8-k65536-256",
                "v12-k65536-4096", "v16-k65536-65536", "v4-k256-0"):
        for rows in (1, 2, 8, 16):
            cases.append(KernelCase(var, 1024, 512, rows))
        cases.append(KernelCase(var, 1024, 512, 8, kernel="gemv"))
        cases.append(KernelCase(var, 1024, 512, None, run_rows=37))
    cases += [
        KernelCase("v8-k256-256", 1000, 300, 1, {"enable_perm": False}),  # I not a multiple of 1024, O % v != 0
        KernelCase("v8-k256-256", 1000, 300, 3, {"enable_norm": False}),
        KernelCase("v8-k4096-0", 1000, 300, None, run_rows=5),
        KernelCase("v8-k256-0", 1024, 512, 1, outl),
        KernelCase("v8-k256-256", 1024, 512, 4, outl),
        KernelCase("v8-k65536-0", 1024, 512, 2, outl),
        KernelCase("v8-k256-256", 1024, 512, None, outl, run_rows=19),
        KernelCase("v8-k256-0", 1024, 512, 1, {"group_num": 2}),
        KernelCase("v8-k256-0", 1024, 512, None, {"group_num": 2}, run_rows=9),
        KernelCase("v12-k4096-0", 1020, 252, 2),  # v=12: 8-byte codebook reads
        KernelCase("v8-k256-256", 1024, 8192, 1),  # more row blocks than CTAs: the persistent loop
        KernelCase("v8-k4096-0", 2048, 8192, 2),
        # tensor-core decode: rows 4..16, odd shapes (scalar loads), outliers, residual, groups, v = 12 / 4
        KernelCase("v8-k256-256", 1000, 300, 5, {"enable_perm": False}),
        KernelCase("v8-k256-256", 1024, 512, 13, outl),
        KernelCase("v8-k65536-0", 1024, 512, 4, outl),
        KernelCase("v8-k256-0", 1024, 512, 11, {"group_num": 2}),
        KernelCase("v12-k4096-0", 1020, 252, 12),
        KernelCase("v8-k4096-0", 2048, 8192, 16),
        # tensor-core prefill (symbolic rows, 4 row tiles of 16 per CTA): partial tiles, outliers, residual, v12/v16
        KernelCase("v8-k4096-0", 1024, 512, None, kernel="mma", run_rows=37),
        KernelCase("v8-k256-256", 1000, 300, None, {"enable_perm": False}, kernel="mma", run_rows=100),
        KernelCase("v8-k256-256", 1024, 512, None, outl, kernel="mma", run_rows=70),
        KernelCase("v12-k65536-4096", 1020, 252, None, kernel="mma", run_rows=19),
        KernelCase("v16-k65536-65536", 1024, 512, None, kernel="mma", run_rows=130),
    ]
    # the whole-entry tensor-core decode kernel (VPTQ_MLC_MMA_WIDE): rows 8 / 11 / 16, residual + outliers with the
    # replicated book, uint16 codes, books read through L1/L2 (K = 65536, with a residual), groups, O % 8 != 0,
    # 32-column chunks (1056 columns), two pairs of vector rows per warp
    wide = "mma-wide"
    cases += [
        KernelCase("v8-k256-256", 1024, 512, 8, outl, kernel=wide),
        KernelCase("v8-k256-256", 1024, 512, 11, outl, kernel=wide),
        KernelCase("v8-k4096-0", 1024, 512, 16, kernel=wide),
        KernelCase("v8-k4096-0", 1024, 512, 11, kernel=wide),
        KernelCase("v8-k65536-256", 1024, 512, 16, kernel=wide),
        KernelCase("v8-k65536-0", 1024, 512, 8, outl, kernel=wide),
        KernelCase("v8-k256-0", 1024, 300, 11, {"group_num": 2}, kernel=wide),
        KernelCase("v8-k256-256", 1056, 264, 13, {"enable_perm": False}, kernel=wide),
        KernelCase("v8-k256-0", 1024, 512, 16, plan={"pair_tiles": 2}, kernel=wide),
        KernelCase("v8-k4096-0", 2048, 1024, 16, kernel=wide),  # 8 splits of 4 chunks
    ]
    # the activation side through our prologue kernels (norm-bias dot, perm, scale), checked through whole linears:
    # one linear's own prologue (rows 1, 11008 wide: 11 CTAs per row), the shared prologue of q/k/v-like and
    # gate/up-like linears, widths that are no multiple of 1024, mixed perms, decode and prefill row counts
    cases += [
        KernelCase("v8-k4096-0", 11008, 512, 1, prologue="p"),
        KernelCase("v8-k65536-256", 1024, 512, 1, prologue="p"),  # the code-sorted kernel behind it
        KernelCase("v8-k4096-0", 4096, 512, 1, prologue="ppp"),
        KernelCase("v8-k4096-0", 4096, 1024, 1, prologue="pp"),
        KernelCase("v8-k256-256", 1000, 300, 2, prologue="pnp"),
        KernelCase("v8-k4096-0", 4096, 512, 5, prologue="pn"),
        KernelCase("v8-k4096-0", 4096, 512, 16, prologue="ppp"),
        # q/k/v and gate/up of 7B width at the tensor-core decode rows: one launch of the register-fragment kernel
        KernelCase("v8-k4096-0", 4096, 4096, 16, prologue="ppp"),
        KernelCase("v8-k256-256", 4096, 11008, 11, prologue="pp"),
        KernelCase("v8-k256-256", 1000, 300, None, run_rows=37, prologue="ppn"),
        # the GEMV with the prologue folded in (rows 1..8 where they fit its shared memory; the registry's choice
        # above runs it too): residual + outliers, books read through L1/L2, 4-wide staging (v12), groups
        KernelCase("v8-k256-256", 1024, 512, 4, outl, prologue="np"),
        KernelCase("v8-k65536-0", 1024, 512, 3, prologue="pnp"),
        KernelCase("v12-k4096-0", 1020, 252, 3, prologue="p"),
        KernelCase("v8-k256-0", 1024, 512, 1, {"group_num": 2}, prologue="pp"),
        KernelCase("v8-k4096-0", 11008, 4096, 1, prologue="p"),  # the 7B down_proj at batch 1
        # its neighbours folded in: the decoder's RMSNorm (q/k/v written side by side, gate/up), silu(gate) * up
        # and the residual add (down_proj), the residual add alone (o_proj); odd widths, GEMV paths as above
        KernelCase("v8-k4096-0", 4096, 4096, 1, prologue="ppp", fused="rmsnorm,concat"),
        KernelCase("v8-k4096-0", 4096, 4096, 1, prologue="p", fused="residual"),
        KernelCase("v8-k4096-0", 4096, 1024, 1, prologue="pp", fused="rmsnorm"),
        KernelCase("v8-k4096-0", 11008, 1024, 1, prologue="p", fused="swiglu,residual"),
        KernelCase("v8-k256-256", 1000, 300, 2, prologue="pnp", fused="rmsnorm,concat"),
        KernelCase("v8-k65536-0", 1024, 512, 3, prologue="p", fused="swiglu,residual"),
        KernelCase("v8-k256-256", 1024, 512, 4, outl, prologue="n", fused="rmsnorm,residual"),
        # the same neighbours at the tensor-core decode rows (the whole-entry kernel's two-launch form): the 7B
        # decoder layer at 16 rows, v8-k256-256 from 9 rows, outliers; K = 65536 books through L1/L2 get no
        # two-launch form from the registry (`_pick_fused_mma`), so their cases check the separate kernels it keeps
        KernelCase("v8-k4096-0", 4096, 4096, 16, prologue="ppp", fused="rmsnorm,concat"),
        KernelCase("v8-k4096-0", 4096, 4096, 16, prologue="p", fused="residual"),
        KernelCase("v8-k4096-0", 4096, 11008, 16, prologue="pp", fused="rmsnorm"),
        KernelCase("v8-k4096-0", 11008, 4096, 16, prologue="p", fused="swiglu,residual"),
        KernelCase("v8-k256-256", 4096, 11008, 12, prologue="pn", fused="rmsnorm"),
        KernelCase("v8-k65536-256", 4096, 4096, 16, prologue="ppp", fused="rmsnorm,concat"),
        KernelCase("v8-k65536-256", 11008, 4096, 12, prologue="p", fused="swiglu,residual"),
        KernelCase("v8-k256-256", 1024, 512, 12, outl, prologue="n", fused="rmsnorm,residual"),
        # register fragments over CTA splits where built with VPTQ_MLC_CTA_SPLITS=1 (as bench/gpu_artifacts.sh builds
        # kcheck; o_proj, down_proj of 4096 outputs): the rows above at 16 rows, and here a residual book at 8 rows,
        # and outliers with a codes region that the splits do not divide evenly (the tile form without the switch)
        KernelCase("v8-k256-256", 4096, 4096, 8, prologue="p", fused="residual"),
        KernelCase("v8-k256-256", 11008, 4096, 12, outl, prologue="p", fused="swiglu,residual"),
    ]
    # long prompts: the registry's prefill dequantizes into a scratch weight and runs the dense GEMM (>= 128 rows)
    for var in ("v8-k256-256", "v8-k4096-0", "v8-k65536-256", "v12-k65536-4096", "v16-k65536-65536", "v4-k256-0"):
        cases.append(KernelCase(var, 1024, 512, None, run_rows=200))
    cases += [
        KernelCase("v8-k256-256", 1024, 512, None, outl, run_rows=200),
        KernelCase("v8-k256-0", 1024, 512, None, {"group_num": 2}, run_rows=130),
        KernelCase("v8-k256-256", 1024, 300, None, {"enable_perm": False}, run_rows=257),  # O % v != 0
        KernelCase("v8-k4096-0", 2048, 8192, None, run_rows=1000),  # 128 x 128 GEMM tiles, partial last tile
        # the dequantize path forced below its threshold: the GEMM's decode and 64 x 64 plans
        KernelCase("v8-k256-256", 1024, 512, None, outl, kernel="dequant-gemm", run_rows=5),
        KernelCase("v12-k65536-4096", 1024, 252, None, kernel="dequant-gemm", run_rows=37),
    ]
    # the dequantize launch with the codebooks in shared memory (residual, groups, O % v != 0, no perm; partial
    # CTAs: 3 vector rows per CTA of 128 threads, column chunks not a multiple of the threads)
    smem = {"threads": 128, "rows_per_cta": 3, "smem_book": True}
    cases += [
        KernelCase("v8-k4096-0", 1024, 512, None, plan=smem, kernel="dequant-gemm", run_rows=200),
        KernelCase("v8-k256-256", 1024, 300, None, {"enable_perm": False}, plan=smem, kernel="dequant-gemm",
                   run_rows=130),
        KernelCase("v8-k256-0", 1024, 512, None, {"group_num": 2}, plan=smem, kernel="dequant-gemm", run_rows=37),
        KernelCase("v8-k256-256", 4096, 1024, None, plan={"threads": 256, "rows_per_cta": 4, "smem_book": True},
                   kernel="dequant-gemm", run_rows=512),
    ]
    # the prologue folded into long-prompt prefill (VPTQ_MLC_PREFILL_FOLD): the gated prologue + the folded kernel
    # as the model runs them, below the threshold (MMA epilogue adds dot and bias) and above it (perm, scale and
    # norm bias in the weight, bias in the GEMM epilogue); residual, outliers, groups, no perm, v12, O % v != 0,
    # bias, the 7B shapes (4096 / 11008 wide: the folding kernel's shared memory), the fold forced at few rows
    bias = {"bias": True}
    cases += [
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, kernel="fold", run_rows=5),
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, kernel="fold", run_rows=37),
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, kernel="fold", run_rows=200),
        KernelCase("v8-k4096-0", 1024, 300, None, {"group_num": 2}, kernel="fold", run_rows=130),
        KernelCase("v8-k4096-0", 1056, 304, None, {"enable_perm": False, **bias}, kernel="fold", run_rows=257),
        KernelCase("v12-k65536-4096", 1024, 252, None, bias, kernel="fold", run_rows=129),
        KernelCase("v8-k4096-0", 4096, 4096, None, kernel="fold", run_rows=2047),
        KernelCase("v8-k4096-0", 11008, 4096, None, kernel="fold", run_rows=300),
        KernelCase("v8-k4096-0", 4096, 11008, None, kernel="fold", run_rows=1000),
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, plan={"from_rows": 0}, kernel="fold",
                   run_rows=5),
        KernelCase("v8-k4096-0", 1024, 512, None, bias, plan={"from_rows": 0}, kernel="fold", run_rows=37),
    ]
    # o_proj / down_proj adding the residual in the folded kernel's epilogues (every branch; the 7B shapes)
    cases += [
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, kernel="fold", run_rows=5, fused="residual"),
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, kernel="fold", run_rows=37, fused="residual"),
        KernelCase("v8-k256-256", 1024, 512, None, {**outl, **bias}, kernel="fold", run_rows=200,
                   fused="residual"),
        KernelCase("v8-k4096-0", 4096, 4096, None, kernel="fold", run_rows=512, fused="residual"),
        KernelCase("v8-k4096-0", 11008, 4096, None, kernel="fold", run_rows=2047, fused="residual"),
        KernelCase("v8-k65536-256", 11008, 4096, None, kernel="fold", run_rows=300, fused="residual"),
    ]
    # q/k/v and gate/up as one folded group (one GEMM over all outputs, written side by side): every branch (decode
    # plan, prefill plan, dequantize + GEMM), perm on and off per member, outliers and residual, the 7B shapes
    cases += [
        KernelCase("v8-k256-256", 1024, 512, None, outl, kernel="fold-group", prologue="pnp", run_rows=5),
        KernelCase("v8-k256-256", 1024, 512, None, outl, kernel="fold-group", prologue="pnp", run_rows=37),
        KernelCase("v8-k256-256", 1024, 512, None, outl, kernel="fold-group", prologue="pnp", run_rows=200),
        KernelCase("v8-k4096-0", 1024, 300, None, {"group_num": 2}, kernel="fold-group", prologue="np",
                   run_rows=130),
        KernelCase("v8-k4096-0", 4096, 4096, None, kernel="fold-group", prologue="ppp", run_rows=512),
        KernelCase("v8-k4096-0", 4096, 11008, None, kernel="fold-group", prologue="pp", run_rows=300),
        KernelCase("v8-k65536-256", 4096, 4096, None, kernel="fold-group", prologue="ppp", run_rows=129),
        KernelCase("v8-k4096-0", 1024, 512, None, plan={"from_rows": 0}, kernel="fold-group", prologue="pp",
                   run_rows=37),
    ]
    return cases


def sweep_cases() -> list[KernelCase]:
    """Launch-shape sweep of the batch-1 decode GEMV on the 7B shapes of a 64 KB codebook (v8-k4096-0: one
    shared-memory copy per CTA, lookups with bank conflicts), 22016 x 4096 standing for the gate/up pair: the
    registry's plan, the book through L1 instead of shared memory, a persistent grid (the copy paid once per CTA),
    other rows x splits and fewer chunks in flight; v8-k256-256 (replicated book) at its plan and persistent."""
    from vptq_mlc.tir_kernels.cuda_gemv import plan_gemv

    sms = 132  # H100 SXM
    out = []
    for var, o, i in (("v8-k4096-0", 4096, 4096), ("v8-k4096-0", 11008, 4096), ("v8-k4096-0", 4096, 11008),
                      ("v8-k4096-0", 22016, 4096), ("v8-k256-256", 11008, 4096), ("v8-k256-256", 22016, 4096)):
        base = KernelCase(var, i, o, 1)
        cfg = base.config()
        p = plan_gemv(cfg, 1, "float16")
        overrides: list[dict[str, Any]] = [{"grid": g} for g in (2 * sms, 3 * sms) if g < p.grid]
        if var == "v8-k4096-0":
            overrides += [{"smem_codebook": False},
                          {"smem_codebook": False, "rows_per_cta": 8, "splits": 2,
                           "grid": -(-cfg.num_vectors // 8)},
                          {"rows_per_cta": 8, "splits": 1, "grid": -(-cfg.num_vectors // 8)},
                          {"rows_per_cta": 2, "splits": 8, "grid": -(-cfg.num_vectors // 2)},
                          {"unroll": 2}]
        seen = {p}
        out.append(base)
        for ov in overrides:
            plan = replace(p, **ov)
            if plan not in seen:
                seen.add(plan)
                out.append(KernelCase(var, i, o, 1, plan=ov))
    return out


def bench_cases(rows: tuple[int, ...] = (1, 8), compare_gemv: tuple[int, ...] = ()) -> list[KernelCase]:
    """Every bench variant x shape x rows (the registry's kernel), plus the gather GEMV forced at the rows in
    `compare_gemv` (next to the tensor-core kernel the registry picks there)."""
    return [KernelCase(v, i, o, r, kernel=k) for v in BENCH_VARIANTS for (o, i) in BENCH_SHAPES
            for r in rows for k in ([""] + (["gemv"] if r in compare_gemv else []))]


WIDE_VARIANTS = ("v8-k4096-0", "v8-k256-256", "v8-k65536-256")


def mma_wide_cases(rows: tuple[int, ...] = (8, 16),
                   plans: tuple[dict, ...] = ({"unroll": 2}, {"steps_per_load": 2}, {"pair_tiles": 2},
                                              {"pair_tiles": 2, "replicated": False},
                                              {"row_groups": 2, "steps_per_load": 2})
                   ) -> list[KernelCase]:
    """The whole-entry tensor-core decode kernel (`mma-wide`) next to the current one (`mma`, forced) on the 7B
    shapes (torch fp16 of each shape is timed with them), plus the overrides in `plans` of the wide kernel at the
    last row count, where they fit shared memory."""
    from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM
    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, smem_bytes

    out = []
    for v in WIDE_VARIANTS:
        for o, i in BENCH_SHAPES[:3]:
            for r in rows:
                out += [KernelCase(v, i, o, r, kernel="mma"), KernelCase(v, i, o, r, kernel="mma-wide")]
            cfg = KernelCase(v, i, o, rows[-1]).config()
            base = plan_mma_wide(cfg, rows[-1])
            seen = {base}  # an override that changes nothing here (e.g. no book copies to drop) is left out
            for p in plans:
                plan = replace(base, **p)
                if plan not in seen and smem_bytes(cfg, plan, rows[-1]) <= MAX_DYN_SMEM:
                    seen.add(plan)
                    out.append(KernelCase(v, i, o, rows[-1], kernel="mma-wide", plan=p))
    return out


REGISTER_TILE_SHAPES = BENCH_SHAPES[:3] + ((22016, 4096), (12288, 4096))  # + gate/up and q/k/v side by side


def register_tile_cases(rows: tuple[int, ...] = (1, 8, 16),
                        plans: tuple[dict, ...] = ({"splits": 4}, {"splits": 8}, {"splits": 16}, {"unroll": 1},
                                                   {"unroll": 4}, {"steps_per_load": 2}, {"row_groups": 2})
                        ) -> list[KernelCase]:
    """A fragments built in registers (`mma-wide` with `register_tiles`) next to the registry's choice (the gather
    GEMV at 1 row, the tile form from 6) on the 7B shapes, plus the overrides in `plans` at the last row count
    where they change the plan and fit shared memory."""
    from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM
    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, smem_bytes

    reg = {"register_tiles": True}
    out = []
    for v in WIDE_VARIANTS:
        for o, i in REGISTER_TILE_SHAPES:
            for r in rows:
                out += [KernelCase(v, i, o, r), KernelCase(v, i, o, r, kernel="mma-wide", plan=reg)]
            cfg = KernelCase(v, i, o, rows[-1]).config()
            base = plan_mma_wide(cfg, rows[-1], register_tiles=True)
            seen = {base}
            for p in plans:
                plan = replace(base, **p)
                if plan not in seen and smem_bytes(cfg, plan, rows[-1]) <= MAX_DYN_SMEM:
                    seen.add(plan)
                    out.append(KernelCase(v, i, o, rows[-1], kernel="mma-wide", plan={**reg, **p}))
    return out


CTA_SPLIT_PLANS = ({"splits": 8, "cta_splits": 4}, {"splits": 16, "cta_splits": 2}, {"splits": 8, "cta_splits": 2},
                   {"splits": 4, "cta_splits": 8}, {"splits": 16, "cta_splits": 4}, {"splits": 8, "cta_splits": 8})


def cta_split_cases(rows: tuple[int, ...] = (8, 16), plans: tuple[dict, ...] = CTA_SPLIT_PLANS) -> list[KernelCase]:
    """The two-launch form (prologue launch included) of o_proj and down_proj of the 7B shape (4096 outputs, with
    the residual; down_proj with silu * up): the tile form (CTA splits off), then register fragments over the CTA
    splits of `plans` (WidePlan overrides of `plan_cta_splits`; the first is its default), timed by `bench kernels`
    (kernel "two")."""
    out = []
    for v in WIDE_VARIANTS[:2]:  # books in shared memory (K = 65536 keeps the separate kernels)
        for i, fused in ((4096, "residual"), (11008, "swiglu,residual")):
            for r in rows:
                out.append(KernelCase(v, i, 4096, r, kernel="two", prologue="p", fused=fused))
                out += [KernelCase(v, i, 4096, r, plan={"register_tiles": True, **p}, kernel="two", prologue="p",
                                   fused=fused) for p in plans]
    return out


def prefill_cases(run_rows: tuple[int, ...] = (128, 512, 2048), plans: tuple[dict, ...] = ()) -> list[KernelCase]:
    """Prefill kernels side by side on real shapes: the dlight dequant matmul, the registry's choice, both paths of
    the fp16 prefill forced (the VQ tensor-core kernel `mma`, dequantize + dense GEMM `dequant-gemm`) and the
    tensor-core kernel with each of `plans`' overrides."""
    out = []
    for var, shapes in (("v8-k4096-0", BENCH_SHAPES[:3]), ("v8-k256-256", BENCH_SHAPES[1:2]),
                        ("v8-k65536-0", BENCH_SHAPES[1:2])):
        for (o, i) in shapes:
            for n in run_rows:
                out += [KernelCase(var, i, o, None, run_rows=n, kernel=k) for k in ("dequant", "", "mma",
                                                                                    "dequant-gemm")]
                out += [KernelCase(var, i, o, None, run_rows=n, kernel="mma", plan=p) for p in plans]
    return out


def code_sorted_cases(sweep: bool = True) -> list[KernelCase]:
    """The code-sorted decode kernel (K = 65536 class, rows 1..2): correctness on small and odd shapes (residual,
    outliers, groups, v = 12 / 16, perm/norm off), the issue's variants x real shapes next to the gather GEMV
    (`kernel="gemv"`), and a launch-shape sweep on two shapes (`plan` = CodeSortedPlan overrides)."""
    outl = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
    cs = "code-sorted"  # forced: the kernel handles every family, also where the registry keeps the gather
    cases = [KernelCase(v, 1024, 512, r, kernel=cs) for v in ("v8-k65536-0", "v8-k65536-256", "v12-k65536-4096",
                                                            "v16-k65536-65536", "v8-k8192-0") for r in (1, 2)]
    cases += [KernelCase("v8-k65536-256", 1000, 300, 1, {"enable_perm": False}, kernel=cs),
              KernelCase("v8-k65536-0", 1000, 300, 2, {"enable_norm": False}, kernel=cs),
              KernelCase("v8-k65536-0", 1024, 512, 1, outl, kernel=cs),
              KernelCase("v8-k65536-256", 1024, 512, 2, outl, kernel=cs),
              KernelCase("v8-k65536-0", 1024, 512, 1, {"group_num": 2}, kernel=cs),
              KernelCase("v12-k65536-4096", 1020, 252, 2, kernel=cs),
              KernelCase("v8-k65536-0", 11008, 4096, 2, kernel=cs)]  # in = 11008: x read from global (> 32 KB)
    for v in BENCH_VARIANTS:
        if "k65536" not in v:
            continue
        for o, i in BENCH_SHAPES:
            for r in (1, 2):  # the code-sorted kernel (also where the registry keeps the gather) next to the gather
                cases += [KernelCase(v, i, o, r, kernel="code-sorted"), KernelCase(v, i, o, r, kernel="gemv")]
    if sweep:
        for o, i in BENCH_SHAPES:
            for plan in ({"warps": 8, "ctas_per_slice": 8}, {"warps": 8, "ctas_per_slice": 16},
                         {"warps": 16, "ctas_per_slice": 8}, {"warps": 16, "ctas_per_slice": 12},
                         {"warps": 16, "ctas_per_slice": 16}, {"warps": 16, "ctas_per_slice": 24},
                         {"warps": 32, "ctas_per_slice": 8}, {"warps": 16, "ctas_per_slice": 16, "unroll": 4}):
                cases.append(KernelCase("v8-k65536-0", i, o, 1, kernel="code-sorted", plan=plan))
    return cases


# ---------------------------------------------------------------- build box
def build_kernel_library(cases: list[KernelCase], out_dir: str | os.PathLike[str], archs: tuple[str, ...] = ("sm_90",),
                         dtype: str = "float16") -> Path:
    """One CUDA library holding every case's kernel as `k<i>`, plus the manifest the GPU side reads."""
    import tvm

    from vptq_mlc.artifact.vq_layout import CODE_SORTED, LAYOUT
    from vptq_mlc.compile.targets import resolve_backend

    (bt,) = resolve_backend("cuda", ",".join(archs))
    bt.prepare()
    select = bt.kernel_selector((LAYOUT, CODE_SORTED))  # as for a model dir converted with --layout auto
    funcs = {}
    calls: list[dict[str, Any] | None] = [None] * len(cases)  # operand names + scratch outputs (None: generic)
    two_extra: dict[str, list] = {}  # case -> the two-launch form's scratch after its xs / dot (CTA splits)
    for i, c in enumerate(cases):
        if c.kernel == "code-sorted":  # launch-shape overrides of the code-sorted kernel (sweeps)
            from vptq_mlc.tir_kernels import cuda_code_sorted as cs

            cfg = c.config()
            cplan = replace(cs.plan_code_sorted(cfg, c.rows, dtype), **c.plan)
            f = cs.vq_code_sorted_cuda(cfg, dtype, c.rows, cplan)
            calls[i] = {"operands": list(cs.code_sorted_operands(cfg, dtype)),
                        "scratch": [[list(cs.code_sorted_scratch(cfg, dtype, c.rows)), "float32"]]}
        elif c.kernel == "mma":  # plan overrides apply to the decode (rows) or prefill (rows=None) plan
            from vptq_mlc.tir_kernels.cuda_mma import plan_mma, plan_mma_prefill, vq_mma_cuda

            cfg = c.config()
            base = plan_mma(cfg) if c.rows else plan_mma_prefill(cfg)
            f = vq_mma_cuda(cfg, dtype, c.rows, replace(base, **c.plan))
        elif c.kernel == "mma-wide":  # plan overrides: WidePlan fields
            from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, vq_mma_wide_cuda

            cfg = c.config()
            base = plan_mma_wide(cfg, c.rows, c.plan.get("register_tiles", False))
            f = vq_mma_wide_cuda(cfg, dtype, c.rows, replace(base, **c.plan))
        elif c.kernel == "dequant-gemm":
            from vptq_mlc.artifact.vq_layout import vq_operand_shapes
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import DequantPlan, vq_prefill_cuda

            f, scratch = vq_prefill_cuda(c.config(), dtype, from_rows=0,
                                         dequant_plan=DequantPlan(**c.plan) if c.plan else None)
            calls[i] = {"operands": list(vq_operand_shapes(c.config())),
                        "scratch": [[list(sh), dt] for sh, dt in scratch]}
        elif c.kernel == "fold":  # the folded prefill and the gated prologue the model runs before it
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS, vq_prefill_folded_cuda
            from vptq_mlc.tir_kernels.cuda_prologue import vq_prologue_cuda

            cfg = c.config()
            frm = c.plan.get("from_rows", DEQUANT_GEMM_FROM_ROWS)
            f, operands, scratch = vq_prefill_folded_cuda(cfg, dtype, cfg.bias, from_rows=frm,
                                                          residual="residual" in c.fused)
            calls[i] = {"operands": list(operands), "scratch": [[list(sh), dt] for sh, dt in scratch]}
            funcs[f"k{i}_prologue"] = vq_prologue_cuda(cfg.in_features, dtype, cfg.enable_perm, frm).with_attr(
                "global_symbol", f"k{i}_prologue")
        elif c.kernel == "fold-group":  # the folded group and the gated shared prologue the model runs before it
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS, vq_prefill_folded_group_cuda
            from vptq_mlc.tir_kernels.cuda_prologue import vq_shared_prologue_cuda

            frm = c.plan.get("from_rows", DEQUANT_GEMM_FROM_ROWS)
            perms = tuple(ch == "p" for ch in c.prologue)
            f, operands, scratch = vq_prefill_folded_group_cuda(c.config(), dtype, perms, from_rows=frm)
            calls[i] = {"operands": list(operands[0]), "group_operands": [list(o) for o in operands],
                        "scratch": [[list(sh), dt] for sh, dt in scratch]}
            funcs[f"k{i}_prologue"] = vq_shared_prologue_cuda(c.in_features, dtype, perms, frm).with_attr(
                "global_symbol", f"k{i}_prologue")
        elif c.kernel == "two":  # the whole-entry kernel's two-launch form with WidePlan overrides (timing)
            from vptq_mlc.artifact.vq_layout import vq_operand_shapes

            f, scratch = two_launch_with_plan(c, dtype)
            calls[i] = {"operands": list(vq_operand_shapes(c.member_configs()[0])),
                        "scratch": [[list(sh), dt] for sh, dt in scratch]}
        elif c.kernel == "dequant":
            from vptq_mlc.tir_kernels.cuda_prefill import dequant_matmul_cuda

            f = dequant_matmul_cuda(c.config(), dtype, bt.target)
        elif c.plan or c.kernel == "gemv":
            from vptq_mlc.tir_kernels.cuda_gemv import plan_gemv, vq_gemv_cuda

            cfg = c.config()
            plan = replace(plan_gemv(cfg, c.rows, dtype), **c.plan)
            f = vq_gemv_cuda(cfg, dtype, c.rows, plan)
        else:
            k = select(c.config(), dtype, c.rows)
            f = k.func
            calls[i] = {"operands": list(k.operands), "scratch": [[list(sh), dt] for sh, dt in k.scratch]}
        funcs[f"k{i}"] = f.with_attr("global_symbol", f"k{i}")
        if c.prologue and c.kernel not in ("fold-group", "two"):
            funcs[f"k{i}_prologue"] = prologue_kernel(c, dtype).with_attr("global_symbol", f"k{i}_prologue")
            shared = select.shared(c.config(), dtype, c.rows, len(c.prologue)) if len(c.prologue) > 1 else None
            if shared is not None:  # the model's VQ launch for linears of one config (CUDA GEMV, decode rows)
                funcs[f"k{i}_shared"] = shared.func.with_attr("global_symbol", f"k{i}_shared")
            perms = tuple(ch == "p" for ch in c.prologue)
            fused = select.fused(c.member_configs()[0], dtype, c.rows, perms, c.fused_input()) if c.rows else None
            if fused is not None and not fused.scratch:  # the model's one launch: prologue folded into the GEMV
                funcs[f"k{i}_fused"] = fused.func.with_attr("global_symbol", f"k{i}_fused")
            two = two_launch_kernel(select, c.member_configs()[0], dtype, c.rows, perms, c.fused_input())
            if two is not None:
                funcs[f"k{i}_two"] = two[0].with_attr("global_symbol", f"k{i}_two")
                if two[1]:
                    two_extra[str(i)] = [[list(sh), dt] for sh, dt in two[1]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ex = tvm.compile(tvm.IRModule(funcs), target=bt.target)
    ex.export_library(str(out / LIBRARY))
    shared = [i for i in range(len(cases)) if f"k{i}_shared" in funcs]
    fused = [i for i in range(len(cases)) if f"k{i}_fused" in funcs]
    two = [i for i in range(len(cases)) if f"k{i}_two" in funcs]
    (out / MANIFEST).write_text(json.dumps({"dtype": dtype, "archs": list(archs), "cases": [asdict(c) for c in cases],
                                            "calls": calls, "shared": shared, "fused": fused, "two_launch": two,
                                            "two_launch_extra": two_extra},
                                           indent=1))
    log.info("built %d kernels in %.1f s -> %s", len(cases), time.time() - t0, out)
    return out / LIBRARY


def two_launch_kernel(select, cfg, dtype: str, rows: int | None, perms: tuple[bool, ...], opts):
    """(the two-launch decode linear of a prologue case, the scratch outputs it takes after its xs / dot and before
    y: CTA splits' partials and counters), or None: at the GEMV rows the GEMV's, whatever the switches say; at the
    tensor-core rows the registry's (`KernelSelector.fused`: the whole-entry kernel's two-launch form, where its
    switch is on). Code-sorted rows have none (their operands differ from the case's generic ones)."""
    if not rows or not cfg.enable_norm:
        return None
    family = select._decode_family(cfg, dtype, rows)
    if family == "gemv":
        from vptq_mlc.tir_kernels.cuda_gemv import vq_gemv_cuda

        return vq_gemv_cuda(cfg, dtype, rows, prologue=perms, fused=opts, two_launch=True), ()
    if family == "mma":
        k = select.fused(cfg, dtype, rows, perms, opts)
        return (k.func, tuple(k.scratch[2 * len(perms):])) if k is not None and k.scratch else None
    return None


def two_launch_with_plan(case: KernelCase, dtype: str):
    """(the two-launch form of `case`'s one normed layer with its plan overrides, its scratch outputs): no
    overrides = the tile form `plan_mma_wide` makes; with `cta_splits` > 1 the overrides apply to
    `plan_cta_splits`' plan."""
    from vptq_mlc.tir_kernels.cuda_mma_wide import (
        plan_cta_splits,
        plan_mma_wide,
        two_launch_scratch_mma,
        vq_mma_wide_cuda,
    )

    cfg = case.member_configs()[0]
    perms = tuple(ch == "p" for ch in case.prologue)
    if case.plan.get("cta_splits", 1) > 1:
        base = plan_cta_splits(cfg, case.rows)
    else:
        base = plan_mma_wide(cfg, case.rows, case.plan.get("register_tiles", False))
    plan = replace(base, **case.plan)
    f = vq_mma_wide_cuda(cfg, dtype, case.rows, plan, prologue=perms, fused=case.fused_input())
    return f, two_launch_scratch_mma(cfg, dtype, case.rows, plan, len(perms))


def prologue_kernel(case: KernelCase, dtype: str):
    """The prologue kernel a prologue case runs: the layer's own (one linear) or the shared one (several)."""
    from vptq_mlc.tir_kernels.cuda_prologue import vq_prologue_cuda, vq_shared_prologue_cuda

    perms = tuple(ch == "p" for ch in case.prologue)
    if len(perms) == 1:
        return vq_prologue_cuda(case.in_features, dtype, perms[0])
    return vq_shared_prologue_cuda(case.in_features, dtype, perms)


# ---------------------------------------------------------------- GPU host
def load_manifest(art_dir: str | os.PathLike[str]) -> tuple[dict, list[KernelCase]]:
    m = json.loads((Path(art_dir) / MANIFEST).read_text())
    return m, [KernelCase(**c) for c in m["cases"]]


def call_spec(manifest: dict, i: int, cfg) -> tuple[list[str], list[tuple[tuple[int, ...], str]]]:
    """(operand names in call order, scratch output shapes) of kernel `k<i>`; generic operands when the manifest
    does not say (forced kernels, older manifests)."""
    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    call = (manifest.get("calls") or [None] * (i + 1))[i]
    if call is None:
        return list(vq_operand_shapes(cfg)), []
    return list(call["operands"]), [(tuple(sh), dt) for sh, dt in call["scratch"]]


def _operands(cfg, tensors: dict[str, np.ndarray], dtype: str,
              names: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(kernel operands in call order, activation-side tensors): the converter's layouts (generic, plus the
    code-sorted entries when the kernel reads them)."""
    from vptq_mlc.artifact.vq_layout import code_sorted_layout, generic_layout, vq_operand_shapes
    from vptq_mlc.checkpoint.dequant import decode_codes

    codes = decode_codes(cfg, tensors)
    lay = generic_layout(cfg, tensors, codes, dtype)
    names = names or list(vq_operand_shapes(cfg))
    if any(n.startswith("cs_") for n in names):
        lay.update(code_sorted_layout(cfg, codes, dtype))
    ops = {k: lay[k] for k in names if k != "residual"}  # an activation, not a layer tensor: the case makes it
    side = {k: lay[k] for k in ("perm", "col_scale", "weight_bias", "bias") if k in lay}
    return ops, side


class CudaKernels:
    """The kernel library on a CUDA device (runtime-only TVM is enough)."""

    def __init__(self, art_dir: str | os.PathLike[str]):
        import tvm

        from vptq_mlc.runtime.device import resolve_device

        self.dev = resolve_device("cuda")[1]  # loads TVM's CUDA plugin by hand in runtime-only mode
        self.manifest, self.cases = load_manifest(art_dir)
        self.mod = tvm.runtime.load_module(str(Path(art_dir) / LIBRARY))

    def func(self, i: int, suffix: str = ""):
        return self.mod[f"k{i}{suffix}"]


def _tvm(t):
    import tvm_ffi

    return tvm_ffi.from_dlpack(t)


def linear_via_kernel(fn, cfg, ops_t: dict, side_t: dict, x, scratch=()):
    """VPTQLinear's forward around one kernel call (torch tensors on the GPU)."""
    import torch

    xs = x[:, side_t["perm"].long()] if "perm" in side_t else x
    if "col_scale" in side_t:
        xs = xs * side_t["col_scale"]
    y = torch.full((x.shape[0], cfg.out_features), float("nan"), dtype=x.dtype, device=x.device)  # poison
    tmp = [torch.empty(sh, dtype=getattr(torch, dt), device=x.device) for sh, dt in scratch]
    fn(_tvm(xs.contiguous()), *(_tvm(t) for t in ops_t.values()), *(_tvm(t) for t in tmp), _tvm(y))
    y = y.float()
    if "weight_bias" in side_t:
        y = y + (x.float() @ side_t["weight_bias"].float())[:, None]
    if "bias" in side_t:
        y = y + side_t["bias"].float()
    return y


# Largest relative L2 error of one output row a kernel may have against the float64 dense reference. fp16 operands
# with fp32 accumulation give <= 6.4e-4 on the H100 (bench/results); one wrong output feature in 8192 adds ~1e-2.
ROW_REL_ERR_MAX = 2e-3


def row_rel_err(y: Any, ref: Any) -> float:
    """max over rows b of ||y[b] - ref[b]|| / ||ref[b]|| (torch tensors [n, out]): a global norm would let one
    wrong row hide among many right ones."""
    return float(((y - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def check_kernels(art_dir: str | os.PathLike[str], seed: int = 0,
                  max_weights: int | None = None) -> list[dict[str, Any]]:
    """Each kernel vs the dense dequant reference; per-row relative L2 error (`row_rel_err`, must stay within
    ROW_REL_ERR_MAX) and NaN check (poisoned output). A case that raises (a launch the GPU refuses) is a failed
    result with its error, and the others still run. `max_weights`: skip layers with more weights (real shapes:
    `time_kernels` checks those against torch)."""
    lib = CudaKernels(art_dir)
    out = []
    rng = np.random.default_rng(seed)
    for i, c in enumerate(lib.cases):
        cfg = c.config()
        if max_weights is not None and cfg.in_features * cfg.out_features > max_weights:
            continue
        try:
            if c.kernel == "fold-group":
                out += _check_fold_group_case(lib, i, c, rng)
            elif c.prologue:
                out += _check_prologue_case(lib, i, c, rng)
            elif c.kernel == "fold":
                out.append(_check_fold_case(lib, i, c, rng))
            else:
                out.append(_check_plain_case(lib, i, c, rng))
        except Exception as e:  # noqa: BLE001 - reported as this case's failure
            msg = (str(e).strip().splitlines() or [""])[-1]
            log.error("case %s failed: %s: %s", c.name, type(e).__name__, msg)
            out.append({"case": c.name, "rel_err": float("nan"), "nan": True, "ok": False,
                        "error": f"{type(e).__name__}: {msg}"})
    return out


def _random_case(lib: CudaKernels, i: int, c: KernelCase, rng) -> tuple[Any, Any, dict, dict, dict, list]:
    """(torch dtype, layer config, random layer tensors, kernel operands, side inputs, scratch outputs) of case i."""
    import torch

    from vptq_mlc.testing.synthetic import random_layer

    dtype = lib.manifest["dtype"]
    cfg = c.config()
    tensors = random_layer(cfg, rng, dtype, scale=0.5 / np.sqrt(cfg.in_features))
    names, scratch = call_spec(lib.manifest, i, cfg)
    ops, side = _operands(cfg, tensors, dtype, names)
    return getattr(torch, dtype), cfg, tensors, ops, side, scratch


def _check_plain_case(lib: CudaKernels, i: int, c: KernelCase, rng) -> dict[str, Any]:
    """One kernel `k<i>(xs, *operands, *scratch, y)` against float64 `x @ dequantize(W).T + bias` per row."""
    import torch

    from vptq_mlc.checkpoint.dequant import dequantize

    tdt, cfg, tensors, ops, side, scratch = _random_case(lib, i, c, rng)
    W = torch.from_numpy(dequantize(cfg, tensors).astype(np.float32)).cuda().double()
    x = torch.randn(c.n(), cfg.in_features, device="cuda").to(tdt)
    ref = x.double() @ W.T
    if cfg.bias:
        ref = ref + torch.from_numpy(np.asarray(tensors["bias"], np.float32)).cuda().double()
    ops_t = {k: torch.from_numpy(np.ascontiguousarray(a)).cuda() for k, a in ops.items()}
    side_t = {k: torch.from_numpy(np.ascontiguousarray(a)).cuda() for k, a in side.items()}
    y = linear_via_kernel(lib.func(i), cfg, ops_t, side_t, x, scratch).double()
    torch.cuda.synchronize()
    err = row_rel_err(y, ref)
    nan = bool(torch.isnan(y).any())
    return {"case": c.name, "rel_err": err, "nan": nan, "ok": err <= ROW_REL_ERR_MAX and not nan}


def _check_fold_case(lib: CudaKernels, i: int, c: KernelCase, rng, device: str = "cuda") -> dict[str, Any]:
    """A folded-prefill case as the model runs it: the gated prologue `k<i>_prologue` (xs and dot poisoned with
    NaN first: from the threshold on it launches nothing and the folded kernel must not read them), then the
    folded kernel `k<i>(x, xs, dot, *operands, w, y)`, whose y (norm bias and bias included) must match float64
    `x @ dequantize(W).T + bias` per row (`+ residual` for a case with the fused residual, the last operand)."""
    import torch

    from vptq_mlc.checkpoint.dequant import dequantize

    tdt, cfg, tensors, ops, side, scratch = _random_case(lib, i, c, rng)
    ops_t = {k: torch.from_numpy(np.ascontiguousarray(a)).to(device) for k, a in ops.items()}
    if "residual" in call_spec(lib.manifest, i, cfg)[0]:  # the last operand; of the output's size, so an add
        ops_t["residual"] = torch.randn(c.n(), cfg.out_features, device=device).to(tdt)  # left out shows
    x = torch.randn(c.n(), cfg.in_features, device=device).to(tdt)
    xs = torch.full_like(x, float("nan"))
    dot = torch.full((c.n(), 1), float("nan"), dtype=torch.float32, device=device)
    pro = [ops_t[k] for k in ("perm", "col_scale", "weight_bias") if k in ops_t]
    lib.func(i, "_prologue")(*(_tvm(t) for t in (x, *pro, xs, dot)))
    y = torch.full((c.n(), cfg.out_features), float("nan"), dtype=tdt, device=device)
    tmp = [torch.full(sh, float("nan"), dtype=getattr(torch, dt), device=device) for sh, dt in scratch]
    lib.func(i)(*(_tvm(t) for t in (x, xs, dot, *ops_t.values(), *tmp, y)))
    W = torch.from_numpy(dequantize(cfg, tensors).astype(np.float32)).to(device).double()
    ref = x.double() @ W.T
    if "bias" in side:
        ref = ref + torch.from_numpy(np.asarray(side["bias"], np.float32)).to(device).double()
    if "residual" in ops_t:
        ref = ref + ops_t["residual"].double()
    if device == "cuda":
        torch.cuda.synchronize()
    err = row_rel_err(y.double(), ref)
    nan = bool(torch.isnan(y).any())
    return {"case": c.name, "rel_err": err, "nan": nan, "ok": err <= ROW_REL_ERR_MAX and not nan}


def _check_fold_group_case(lib: CudaKernels, i: int, c: KernelCase, rng,
                           device: str = "cuda") -> list[dict[str, Any]]:
    """A folded-group case as the model runs it: the gated shared prologue `k<i>_prologue` (every xs and dot
    poisoned with NaN first), then `k<i>(x, per member: xs, dot, *operands; w, y)` writing every member's output
    into its columns of one y (poisoned too); each member's columns against float64 `x @ dequantize(W).T`. One
    result per member."""
    import torch

    from vptq_mlc.checkpoint.dequant import dequantize
    from vptq_mlc.testing.synthetic import random_layer

    dtype = lib.manifest["dtype"]
    tdt = getattr(torch, dtype)
    call = lib.manifest["calls"][i]

    def on_device(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(np.ascontiguousarray(a)).to(device) for k, a in arrays.items()}

    x = torch.randn(c.n(), c.in_features, device=device).to(tdt)
    members = []
    for cfg, names in zip(c.member_configs(), call["group_operands"], strict=True):
        tensors = random_layer(cfg, rng, dtype, scale=0.5 / np.sqrt(cfg.in_features))
        ops, side = _operands(cfg, tensors, dtype, names)
        members.append((cfg, tensors, on_device(ops), on_device(side)))
    ins, outs = [x], []
    for *_, side_t in members:
        ins += [side_t[k] for k in ("perm", "col_scale", "weight_bias") if k in side_t]
        outs += [torch.full_like(x, float("nan")),
                 torch.full((c.n(), 1), float("nan"), dtype=torch.float32, device=device)]
    lib.func(i, "_prologue")(*(_tvm(t) for t in ins), *(_tvm(t) for t in outs))
    width = c.out_features
    y = torch.full((c.n(), width * len(members)), float("nan"), dtype=tdt, device=device)
    tmp = [torch.full(tuple(sh), float("nan"), dtype=getattr(torch, dt), device=device) for sh, dt in call["scratch"]]
    args = [x] + [t for m, (*_, ops_t, _) in enumerate(members) for t in (outs[2 * m], outs[2 * m + 1],
                                                                          *ops_t.values())]
    lib.func(i)(*(_tvm(t) for t in (*args, *tmp, y)))
    res = []
    for m, (cfg, tensors, _, _) in enumerate(members):
        W = torch.from_numpy(dequantize(cfg, tensors).astype(np.float32)).to(device).double()
        ym = y[:, m * width:(m + 1) * width].double()
        err = row_rel_err(ym, x.double() @ W.T)
        nan = bool(torch.isnan(ym).any())
        res.append({"case": f"{c.name}-member{m}", "rel_err": err, "nan": nan,
                    "ok": err <= ROW_REL_ERR_MAX and not nan})
    if device == "cuda":
        torch.cuda.synchronize()
    return res


def _check_prologue_case(lib: CudaKernels, i: int, c: KernelCase, rng, device: str = "cuda") -> list[dict[str, Any]]:
    """A prologue case: our prologue kernel computes every member's xs and norm-bias dot from one x (outputs
    poisoned with NaN first), then each member's VQ kernel (one launch for all where the library has the shared
    kernel `k<i>_shared`, as the model runs them), + dot + bias, against that member's
    `x @ dequantize(W).T + bias`; also xs bit for bit against torch's gather and scale (one fp16 rounding each way)
    and the dot against float64. One result per member."""
    import torch

    from vptq_mlc.checkpoint.dequant import dequantize
    from vptq_mlc.testing.synthetic import random_layer

    dtype = lib.manifest["dtype"]
    tdt = getattr(torch, dtype)

    def on_device(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(np.ascontiguousarray(a)).to(device) for k, a in arrays.items()}

    x = torch.randn(c.n(), c.in_features, device=device).to(tdt)
    members = []
    for cfg in c.member_configs():
        tensors = random_layer(cfg, rng, dtype, scale=0.5 / np.sqrt(cfg.in_features))
        names, scratch = call_spec(lib.manifest, i, cfg)
        ops, side = _operands(cfg, tensors, dtype, names)
        members.append((cfg, tensors, scratch, on_device(ops), on_device(side)))
    ins = [x]
    outs = []
    for *_, side_t in members:
        ins += [side_t[k] for k in ("perm", "col_scale", "weight_bias") if k in side_t]
        outs += [torch.full_like(x, float("nan")),
                 torch.full((c.n(), 1), float("nan"), dtype=torch.float32, device=device)]
    lib.func(i, "_prologue")(*(_tvm(t) for t in ins), *(_tvm(t) for t in outs))
    shared = i in lib.manifest.get("shared", [])
    if shared:  # one launch of the VQ kernel for every member, as the model runs q/k/v and gate/up
        ys = [torch.full((c.n(), cfg.out_features), float("nan"), dtype=tdt, device=device)
              for cfg, *_ in members]
        args = [t for m, (_, _, _, ops_t, _) in enumerate(members) for t in (outs[2 * m], *ops_t.values())]
        lib.func(i, "_shared")(*(_tvm(t) for t in args), *(_tvm(y) for y in ys))
    res = []
    for m, (cfg, tensors, scratch, ops_t, side_t) in enumerate(members):
        xs, dot = outs[2 * m], outs[2 * m + 1]
        want_xs = (x[:, side_t["perm"].long()] if "perm" in side_t else x) * side_t["col_scale"]
        xs_exact = bool(torch.equal(xs, want_xs))
        want_dot = x.double() @ side_t["weight_bias"].double()
        # relative to the sum of |terms| (the scale of an fp32 summation's rounding): |dot| itself can be small
        dot_scale = (x.double().abs() @ side_t["weight_bias"].double().abs()).max().clamp_min(1e-30)
        dot_err = float((dot[:, 0].double() - want_dot).abs().max() / dot_scale)
        if shared:
            y = ys[m]
        else:
            y = torch.full((c.n(), cfg.out_features), float("nan"), dtype=tdt, device=device)
            tmp = [torch.empty(sh, dtype=getattr(torch, dt), device=device) for sh, dt in scratch]
            lib.func(i)(_tvm(xs), *(_tvm(t) for t in ops_t.values()), *(_tvm(t) for t in tmp), _tvm(y))
        y = y.double() + dot.double()
        W = torch.from_numpy(dequantize(cfg, tensors).astype(np.float32)).to(device).double()
        ref = x.double() @ W.T
        if "bias" in side_t:
            y = y + side_t["bias"].double()
            ref = ref + side_t["bias"].double()
        if device == "cuda":
            torch.cuda.synchronize()
        err = row_rel_err(y, ref)
        nan = bool(torch.isnan(y).any() or torch.isnan(xs).any() or torch.isnan(dot).any())
        name = f"{c.name}-m{m}" + ("-shared" if shared else "")
        res.append({"case": name, "rel_err": err, "nan": nan, "xs_exact": xs_exact, "dot_err": dot_err,
                    "ok": err <= ROW_REL_ERR_MAX and not nan and xs_exact and dot_err <= DOT_REL_ERR_MAX})
    if i in lib.manifest.get("fused", []):
        res += _check_fused(lib, i, c, x, members, device)
    if i in lib.manifest.get("two_launch", []):
        res += _check_fused(lib, i, c, x, members, device, two_launch=True)
    return res


def _check_fused(lib: CudaKernels, i: int, c: KernelCase, x, members: list, device: str,
                 two_launch: bool = False) -> list[dict[str, Any]]:
    """The fused kernel `k<i>_fused` (prologue folded into the GEMV, with the case's neighbours; `two_launch`: its
    two-launch form `k<i>_two`, whose xs / dot scratch outputs come before y) on the prologue case's x and members:
    every member's y against float64 `xin @ dequantize(W).T + bias (+ residual)`, where xin is the layer input the
    neighbours make (RMSNorm(x) * gamma or silu(x) * up, computed by torch in fp32 and rounded to the model dtype,
    as the kernel and TVM's ops round), outputs poisoned with NaN."""
    import torch

    from vptq_mlc.checkpoint.dequant import dequantize

    opts = c.fused_input()
    tdt = getattr(torch, lib.manifest["dtype"])
    n = c.n()
    if opts.source == "rmsnorm":
        gamma = (1 + 0.1 * torch.randn(c.in_features, device=device)).to(tdt)
        xf = x.float()
        xin = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + opts.eps) * gamma.float()).to(tdt)
        args = [x, gamma]
    elif opts.source == "swiglu":
        up = torch.randn(n, c.in_features, device=device).to(tdt)
        xin = (x.float() * torch.sigmoid(x.float())).to(tdt) * up
        args = [x, up]
    else:
        xin, args = x, [x]
    for _, _, _, ops_t, side_t in members:
        args += [side_t[k] for k in ("perm", "col_scale", "weight_bias") if k in side_t] + list(ops_t.values())
    out_features = [cfg.out_features for cfg, *_ in members]
    residual = torch.randn(n, out_features[0], device=device).to(tdt) if opts.residual else None
    if residual is not None:
        args.append(residual)
    ys = [torch.full((n, sum(out_features)), float("nan"), dtype=tdt, device=device)] if opts.concat else [
        torch.full((n, o), float("nan"), dtype=tdt, device=device) for o in out_features]
    scratch = [t for _ in members for t in (torch.full((n, c.in_features), float("nan"), dtype=tdt, device=device),
                                            torch.full((n, 1), float("nan"), dtype=torch.float32, device=device))
               ] if two_launch else []
    if two_launch:  # CTA splits' partials and counters
        scratch += _poisoned_scratch(lib.manifest.get("two_launch_extra", {}).get(str(i), []), device)
    lib.func(i, "_two" if two_launch else "_fused")(*(_tvm(t) for t in [*args, *scratch, *ys]))
    if opts.concat:
        ys = list(torch.split(ys[0], out_features, dim=1))
    res = []
    for m, (cfg, tensors, _, _, side_t) in enumerate(members):
        y = ys[m].double()
        W = torch.from_numpy(dequantize(cfg, tensors).astype(np.float32)).to(device).double()
        ref = xin.double() @ W.T
        if "bias" in side_t:
            y = y + side_t["bias"].double()
            ref = ref + side_t["bias"].double()
        if residual is not None:
            ref = ref + residual.double()
        if device == "cuda":
            torch.cuda.synchronize()
        err = row_rel_err(y, ref)
        nan = bool(torch.isnan(y).any())
        res.append({"case": f"{c.name}-m{m}-" + ("two-launch" if two_launch else "fused"), "rel_err": err, "nan": nan,
                    "ok": err <= ROW_REL_ERR_MAX and not nan})
    return res


# fp32 sums of fp16 products in another order than float64's, relative to the largest row's sum of |terms|
# (a single row's dot can be near zero: 11008 random terms gave 8e-5 relative to |dot| itself on an H100)
DOT_REL_ERR_MAX = 1e-5


def _random_operands(cfg, dtype: str, gen) -> dict:
    """Random codes/codebooks in the generic layout, made on the GPU (bench speed does not depend on values
    beyond the code distribution, which is uniform like real VPTQ codes)."""
    import torch

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    tdt = getattr(torch, dtype)
    ops = {}
    for name, (shape, dt) in vq_operand_shapes(cfg).items():
        if dt == "float":
            ops[name] = (torch.randn(shape, device="cuda", generator=gen) * 0.02).to(tdt)
        else:
            hi = {"codes": cfg.num_centroids, "res_codes": cfg.num_res_centroids,
                  "outlier_codes": cfg.num_outlier_centroids}[name]
            ops[name] = torch.randint(0, hi, shape, device="cuda", generator=gen, dtype=torch.int32).to(
                getattr(torch, dt))
    return ops


class ColdL2Timer:
    """Median kernel time with a cold L2: read (never zero) a buffer larger than L2 before every call."""

    def __init__(self, flush_bytes: int = 512 << 20):
        import torch

        self.flush = torch.ones(flush_bytes // 4, dtype=torch.float32, device="cuda")
        self.sink = torch.zeros(1, device="cuda")

    def __call__(self, fn, reps: int = 50, warmup: int = 5) -> float:
        import torch

        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sink += self.flush.sum()  # read 512 MiB: evicts L2 with clean lines
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return float(np.median(times))


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read + written (1 GiB)."""
    import torch

    src = torch.ones(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        dst.copy_(src)
    b.record()
    b.synchronize()
    return 2 * src.numel() * 4 * 10 / (a.elapsed_time(b) * 1e-3) / 1e9


def kernel_bytes(cfg, rows: int, el: int = 2, operands: list | None = None, scratch_bytes: int = 0) -> int:
    """Bytes a kernel must read/write at least: codes, codebooks, activations, output (generic layout), or the
    given operand tensors + its scratch written and read back (code-sorted: entries, offsets, fp32 partials)."""
    from vptq_mlc.artifact.vq_layout import vq_operand_shapes

    total = 0
    if operands is not None:
        total = sum(t.numel() * t.element_size() for t in operands) + 2 * scratch_bytes
    else:
        for _, (shape, dt) in vq_operand_shapes(cfg).items():
            total += int(np.prod(shape)) * (el if dt == "float" else 2)
    return total + rows * (cfg.in_features + cfg.out_features) * el


def _add_code_sorted(cfg, ops: dict, dtype: str) -> None:
    """Add `cs_entries`/`cs_offsets` built by the converter's layout code from the random generic codes."""
    import torch

    from vptq_mlc.artifact.vq_layout import code_sorted_layout
    from vptq_mlc.checkpoint.dequant import LayerCodes

    G, S, N = cfg.group_num, cfg.group_size, cfg.num_vectors

    def split(t):  # [N, G*S] -> [G, N, S]
        return t.to(torch.int32).cpu().numpy().reshape(N, G, S).transpose(1, 0, 2)

    res = split(ops["res_codes"]) if cfg.has_residual else None
    lay = code_sorted_layout(cfg, LayerCodes(split(ops["codes"]), res, None, None), dtype)
    for k, a in lay.items():
        ops[k] = torch.from_numpy(a).cuda()


def _poisoned_scratch(spec, device: str) -> list:
    """Scratch outputs of `spec` ([(shape, dtype)]) a kernel must write before it reads them: NaN in float ones, 7 in
    integer ones (CTA splits' arrival counters, which the prologue launch must zero)."""
    import torch

    return [torch.full(tuple(sh), float("nan") if dt.startswith("float") else 7, dtype=getattr(torch, dt),
                       device=device) for sh, dt in spec]


def _dense_weight(cfg, ops: dict):
    """(codes-region weight [O, L] fp32, outlier weight [O, outlier_size] fp32 or None) from the generic layout
    on the GPU, by torch indexing (independent of the kernels)."""
    import torch

    v, s_ = cfg.vector_len, cfg.group_size
    rows = torch.arange(cfg.out_features, device="cuda")
    k = torch.arange(cfg.group_num * s_, device="cuda")
    codes = ops["codes"].to(torch.int32)[rows // v]  # [O, L]
    g = (k // s_)[None, :]
    w = ops["centroids"].float()[g, codes.long(), (rows % v)[:, None]]
    if cfg.has_residual:
        w = w + ops["res_centroids"].float()[g, ops["res_codes"].to(torch.int32)[rows // v].long(), (rows % v)[:, None]]
    wo = None
    if cfg.has_outliers:
        vo = cfg.outlier_vector_len
        oc = ops["outlier_codes"].to(torch.int32)[rows // vo].long()
        wo = ops["outlier_centroids"].float()[oc, (rows % vo)[:, None]]
    return w, wo


def _time_two_launch(lib: CudaKernels, i: int, c: KernelCase, timer, gen, reps: int, bw: float) -> dict[str, Any]:
    """One "two" case: the two-launch form (both launches) with a cold L2, and its output against float64
    `xin[:, perm] * col_scale @ W.T + xin @ weight_bias + residual` (xin: x, or silu(x) * up rounded to fp16)."""
    import torch

    dtype = lib.manifest["dtype"]
    tdt = getattr(torch, dtype)
    cfg = c.member_configs()[0]
    n, I, O = c.n(), cfg.in_features, cfg.out_features  # noqa: E741
    names, scratch = call_spec(lib.manifest, i, cfg)
    ops = _random_operands(cfg, dtype, gen)
    perm = torch.randperm(I, device="cuda", generator=gen).to(torch.int32)
    col_scale = (1 + 0.1 * torch.randn(I, device="cuda", generator=gen)).to(tdt)
    weight_bias = (0.01 * torch.randn(I, device="cuda", generator=gen)).to(tdt)
    x = torch.randn(n, I, device="cuda", generator=gen).to(tdt)
    opts = c.fused_input()
    lead = [x]
    xin = x
    if opts.source == "swiglu":
        up = torch.randn(n, I, device="cuda", generator=gen).to(tdt)
        lead.append(up)
        xin = (x.float() * torch.sigmoid(x.float())).to(tdt) * up
    residual = torch.randn(n, O, device="cuda", generator=gen).to(tdt) if opts.residual else None
    y = torch.full((n, O), float("nan"), dtype=tdt, device="cuda")
    tmp = _poisoned_scratch(scratch, "cuda")
    args = [*lead, perm, col_scale, weight_bias, *(ops[nm] for nm in names),
            *([residual] if residual is not None else []), *tmp, y]
    fn = lib.func(i)
    targs = [_tvm(t) for t in args]
    fn(*targs)
    torch.cuda.synchronize()
    w, wo = _dense_weight(cfg, ops)
    xs = (xin[:, perm.long()] * col_scale).double()
    ref = xs[:, cfg.outlier_size:] @ w.double().T + xin.double() @ weight_bias.double()[:, None]
    if wo is not None:
        ref = ref + xs[:, :cfg.outlier_size] @ wo.double().T
    if residual is not None:
        ref = ref + residual.double()
    err = row_rel_err(y.double(), ref)
    del w, wo
    us = timer(functools.partial(fn, *targs), reps)
    form = (f"two, P{c.plan.get('splits', '')} x {c.plan['cta_splits']} CTAs" if c.plan.get("cta_splits", 1) > 1
            else "two, tile form")
    nbytes = kernel_bytes(cfg, n, operands=[ops[nm] for nm in names])
    return {"case": c.name, "variant": c.variant, "shape": f"{O}x{I}", "rows": n, "kernel": form, "plan": c.plan,
            "us": us, "bytes": nbytes, "pct_copy_bw": 100 * nbytes / (us * 1e-6) / (bw * 1e9), "rel_err": err,
            "nan": bool(torch.isnan(y).any())}


def _generic_rel_err(cfg, ops: dict, xs, fn, args, y) -> float:
    """Relative error of one call against a torch dense weight rebuilt from the generic layout (checks the
    large-shape paths, e.g. the persistent grid, that the small check suite does not reach)."""
    import torch

    osz = cfg.outlier_size
    w, wo = _dense_weight(cfg, ops)
    ref = xs[:, osz:].double() @ w.double().T
    if wo is not None:
        ref = ref + xs[:, :osz].double() @ wo.double().T
    y.fill_(float("nan"))
    fn(*args)
    torch.cuda.synchronize()
    out = y.double()
    del w
    return row_rel_err(out, ref)


def time_kernels(art_dir: str | os.PathLike[str], reps: int = 50) -> dict[str, Any]:
    """Per case: our kernel (cold L2), torch fp16 x @ W.T of the same shape (cold L2), bytes, % of copy BW."""
    import torch

    lib = CudaKernels(art_dir)
    dtype = lib.manifest["dtype"]
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    bw = copy_bandwidth()
    timer = ColdL2Timer()
    rows_out, fp16_cache = [], {}

    def fp16_us(xs, cfg) -> float:
        """torch fp16 `xs @ W.T` of the layer's shape (cold L2), timed once per (rows, out, in)."""
        key = (xs.shape[0], cfg.out_features, cfg.in_features)
        if key not in fp16_cache:
            w = torch.randn(cfg.out_features, cfg.in_features, device="cuda", generator=gen).to(tdt)
            fp16_cache[key] = timer(lambda: torch.matmul(xs, w.T), reps)
            del w
        return fp16_cache[key]

    prev: tuple = (None, None)  # (layer key, operands): consecutive cases of one layer share its operands
    for i, c in enumerate(lib.cases):
        cfg = c.config()
        n = c.n()
        if c.kernel == "two":
            row = _time_two_launch(lib, i, c, timer, gen, reps, bw)
            ref_us = fp16_us(torch.randn(n, cfg.in_features, device="cuda", generator=gen).to(tdt), cfg)
            rows_out.append({**row, "fp16_us": ref_us, "speedup_vs_fp16": ref_us / row["us"]})
            log.info("%s: %.2f us (fp16 %.2f), row rel err %.1e", c.name, row["us"], ref_us, row["rel_err"])
            continue
        names, scratch = call_spec(lib.manifest, i, cfg)
        lkey = (c.variant, c.in_features, c.out_features, json.dumps(c.layer, sort_keys=True))
        ops = prev[1] if prev[0] == lkey else _random_operands(cfg, dtype, gen)
        if any(nm.startswith("cs_") for nm in names) and "cs_entries" not in ops:
            _add_code_sorted(cfg, ops, dtype)
        prev = (lkey, ops)
        xs = torch.randn(n, cfg.in_features, device="cuda", generator=gen).to(tdt)
        y = torch.empty(n, cfg.out_features, dtype=tdt, device="cuda")
        tmp = [torch.empty(sh, dtype=getattr(torch, dt), device="cuda") for sh, dt in scratch]
        args = [_tvm(xs), *(_tvm(ops[nm]) for nm in names), *(_tvm(t) for t in tmp), _tvm(y)]
        fn = lib.func(i)
        us = timer(functools.partial(fn, *args), reps)
        err = _generic_rel_err(cfg, ops, xs, fn, args, y)
        ref_us = fp16_us(xs, cfg)
        nbytes = kernel_bytes(cfg, n, operands=[ops[nm] for nm in names],
                              scratch_bytes=sum(t.numel() * t.element_size() for t in tmp))
        rows_out.append({"case": c.name, "variant": c.variant, "shape": f"{cfg.out_features}x{cfg.in_features}",
                         "rows": n, "kernel": c.kernel or ("code-sorted" if "cs_entries" in names else "auto"),
                         "us": us, "fp16_us": ref_us, "speedup_vs_fp16": ref_us / us,
                         "bytes": nbytes, "pct_copy_bw": 100 * nbytes / (us * 1e-6) / (bw * 1e9), "rel_err": err})
        del args, tmp
    return {"copy_GBps": bw, "device": torch.cuda.get_device_name(), "flush": "read 512 MiB before each call",
            "rows": rows_out}
