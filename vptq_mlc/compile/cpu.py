"""The CPU (llvm) target backend (`CpuBackend`): which instruction set a library is compiled for, which CPU
features it then needs at run time, and the relax pipeline that schedules the dense matmuls for the CPU.

Why: LLVM's default x86-64 target has no AVX2/FMA/F16C, so every fp16 value is converted in software and nothing
is vectorized wider than SSE2; compiled for the host's CPU the same model runs an order of magnitude faster. A
library compiled for one CPU may use instructions another lacks, so the features it needs are recorded in
`_metadata` (`cpu_features`, /proc/cpuinfo names) and checked before any kernel runs (runtime/library.py).

`--arch` (portable builds): `native` (default: the host's CPU as LLVM names it, minus the features its /proc/cpuinfo
lacks, as in a VM that hides AVX-512), `x86-64-v2` / `x86-64-v3` / `x86-64-v4` (the psABI levels), `aarch64`
(generic Armv8-A with NEON), or any CPU name LLVM knows for x86-64 or AArch64 (`znver4`, `neoverse-n1`, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax
from tvm.target import Target

from vptq_mlc.artifact.cpu_features import host_cpu_flags
from vptq_mlc.artifact.vq_layout import LAYOUT
from vptq_mlc.compile.backend import TargetBackend, vm_lowering_passes
from vptq_mlc.errors import CompileError
from vptq_mlc.tir_kernels.registry import CpuKernelSelector, KernelSelector

X86_TRIPLE = "x86_64-linux-gnu"
ARM_TRIPLE = "aarch64-linux-gnu"
LEVELS = {"x86-64-v2": X86_TRIPLE, "x86-64-v3": X86_TRIPLE, "x86-64-v4": X86_TRIPLE}
ARM_GENERIC = "aarch64"
# LLVM feature -> /proc/cpuinfo flag, for the features whose instructions generated code can contain
X86_FLAGS = {
    "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq", "avxvnni": "avx_vnni",
}
ARM_FLAGS = {
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "sve": "sve", "sve2": "sve2", "i8mm": "i8mm",
    "bf16": "bf16", "fp16fml": "asimdfhm", "rcpc": "lrcpc", "lse": "atomics",
}


@dataclass(frozen=True)
class CPUArch:
    """One llvm build: the TVM target, its file-name label, and what it needs of the CPU that runs it."""

    name: str  # "native", "x86-64-v3", "aarch64", "neoverse-n1"
    target: Target
    machine: str  # platform.machine() of the hosts it runs on: x86_64, aarch64
    features: tuple[str, ...]  # /proc/cpuinfo flags it needs

    @property
    def label(self) -> str:
        """File-name label: `llvm-<cpu>` for host builds (the host's CPU name), `llvm-<arch>` otherwise."""
        cpu = str(self.target.attrs.get("mcpu", "generic"))
        return f"llvm-{cpu if self.name == 'native' else self.name}"

    def metadata(self) -> dict:
        return {"kind": "llvm", "arch": self.name, "mcpu": str(self.target.attrs.get("mcpu", "generic")),
                "machine": self.machine, "cpu_features": list(self.features)}


def _flag_map(triple: str) -> dict[str, str]:
    return ARM_FLAGS if triple.startswith("aarch64") else X86_FLAGS


def _enabled(target: Target) -> set[str]:
    from tvm.target import codegen

    return {str(k) for k in codegen.llvm_get_cpu_features(target)}


def _make(name: str, triple: str, mcpu: str, mattr: list[str]) -> CPUArch:
    spec = {"kind": "llvm", "mtriple": triple, "mcpu": mcpu}
    if mattr:
        spec["mattr"] = mattr
    target = Target(spec)
    flags = _flag_map(triple)
    needed = tuple(sorted(flags[f] for f in _enabled(target) if f in flags))
    return CPUArch(name, target, "aarch64" if triple.startswith("aarch64") else "x86_64", needed)


def native_arch() -> CPUArch:
    """The host's CPU; features LLVM's CPU model has but /proc/cpuinfo does not list are switched off."""
    from tvm.target import codegen

    triple = str(codegen.llvm_get_system_triple())
    cpu = str(codegen.llvm_get_system_cpu())
    probe = Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})
    have = host_cpu_flags()
    flags = _flag_map(triple)
    mattr = sorted(f"-{f}" for f in _enabled(probe) if f in flags and have is not None and flags[f] not in have)
    return _make("native", triple, cpu, mattr)


def parse_arch(arch: str | None) -> CPUArch:
    """`--arch` of an llvm build -> CPUArch (one-line CompileError naming the choices)."""
    name = (arch or "native").strip().lower()
    if name in ("native", "host"):
        return native_arch()
    if name in LEVELS:
        return _make(name, LEVELS[name], name, [])
    if name in (ARM_GENERIC, "arm64", "armv8-a"):
        return _make(ARM_GENERIC, ARM_TRIPLE, "generic", ["+neon"])
    from tvm.target import codegen

    for triple in (X86_TRIPLE, ARM_TRIPLE):
        if codegen.llvm_is_valid_cpu(name, triple):
            return _make(name, triple, name, [])
    raise CompileError(f"unknown CPU arch {arch!r} for --target llvm; use native, x86-64-v2, x86-64-v3, x86-64-v4, "
                       "aarch64 or an LLVM CPU name (znver4, skylake-avx512, neoverse-n1, ...)")


def parse_archs(arch: str | None) -> list[CPUArch]:
    names = [a.strip() for a in (arch or "native").split(",") if a.strip()] or ["native"]
    archs = [parse_arch(a) for a in names]
    labels = [a.label for a in archs]
    dup = sorted({lb for lb in labels if labels.count(lb) > 1})
    if dup:
        raise CompileError(f"--arch lists {dup[0]} twice; name each CPU arch once")
    return archs


def vector_lanes(target: Target, bits: int = 32) -> int:
    """Lanes of a `bits`-wide value in one vector register of the target (SSE/NEON 128, AVX 256, AVX-512 512)."""
    feats = _enabled(target)
    width = 512 if "avx512f" in feats else 256 if "avx" in feats else 128
    return width // bits


# ---- the pipeline -------------------------------------------------------------------------------------------


def schedule_dense_rows(func: tvm.tirx.PrimFunc, lanes: int) -> tvm.tirx.PrimFunc | None:
    """CPU schedule of `Y[rows..., r] = sum_k X[rows..., k] * W[r, k]` (the lm_head, dense linears): a dot product
    per (row, r) in `lanes` vector accumulators (rfactor over k), parallel over r, so W streams through once at
    memory speed. None for any other function (single-block functions of exactly this access pattern only)."""
    from tvm import s_tir, tirx

    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return None
    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - no root block: not a legalized op
        return None
    if len(blocks) != 1:
        return None
    blk = blocks[0]
    stmt = sch.get(blk)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]  # 0 data parallel, 2 reduction
    loops = sch.get_loops(blk)
    if len(kinds) < 3 or kinds[-1] != 2 or any(k != 0 for k in kinds[:-1]) or len(loops) != len(kinds):
        return None
    r_var, k_var = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
    weights = [rg for rg in stmt.reads if len(rg.region) == 2 and rg.region[0].min.same_as(r_var)
               and rg.region[1].min.same_as(k_var)]
    k_ext = stmt.iter_vars[-1].dom.extent
    if len(weights) != 1 or len(stmt.reads) != 2 or len(stmt.writes) != 1 or not isinstance(k_ext, tirx.IntImm):
        return None
    while lanes > 1 and int(k_ext) % lanes:
        lanes //= 2
    *rows, r, k = loops
    if len(rows) > 1:
        sch.fuse(*rows)
    r_ext = stmt.iter_vars[-2].dom.extent
    if not isinstance(r_ext, tirx.IntImm):
        return None
    tile = next(t for t in (16, 8, 4, 2, 1) if int(r_ext) % t == 0)  # a partial tile loses rfactor's bounds check
    r_out, r_in = sch.split(r, [None, tile])
    sch.parallel(r_out)  # inside the row loop: one parallel region per activation row (1..16 at decode)
    if lanes > 1:
        _, k_in = sch.split(k, [None, lanes])
        rf = sch.rfactor(k_in, 0)
        sch.set_scope(rf, 0, "local")
        sch.compute_at(rf, r_in)  # lanes accumulators per output
        *_, acc_lanes, acc_k = sch.get_loops(rf)
        sch.reorder(acc_k, acc_lanes)
        sch.vectorize(acc_lanes)
        sch.decompose_reduction(rf, acc_k)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_dense_pass(lanes: int) -> tvm.transform.Pass:
    """Every dense `x @ W.T` PrimFunc scheduled by `schedule_dense_rows` (others left as they are)."""

    @tvm.transform.module_pass(opt_level=0, name="VPTQScheduleDenseCPU")
    def schedule_dense(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        funcs = {}
        for gv, f in mod.functions.items():
            scheduled = schedule_dense_rows(f, lanes) if isinstance(f, tvm.tirx.PrimFunc) else None
            funcs[gv] = scheduled if scheduled is not None else f
        return tvm.IRModule(funcs, attrs=mod.attrs)

    return schedule_dense


# ---- the backend --------------------------------------------------------------------------------------------


class CpuBackend(TargetBackend):
    """`--target llvm --arch ...` (or `cpu`): one library per CPU arch, its needed CPU features in `_metadata`;
    the generic VQ kernel with its CPU schedule, logits summed in fp32 (an fp16 running sum is converted at every
    step on a CPU)."""

    kind = "llvm"
    logits_dtype = "float32"
    narrow_codebooks = True  # the generic kernel widens each codebook entry as it reads it

    def __init__(self, arch: CPUArch):
        super().__init__(arch.target, arch.label, (arch.label.removeprefix("llvm-"),))
        self.arch = arch

    @classmethod
    def resolve(cls, arch: str | None) -> list[TargetBackend]:
        return [cls(a) for a in parse_archs(arch)]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.arch.metadata()

    def kernel_selector(self, layouts: Iterable[str] = (LAYOUT,)) -> KernelSelector:
        return CpuKernelSelector(self.target, layouts)

    def passes(self) -> list[tvm.transform.Pass]:
        """TVM's CPU pipeline (relax/backend/cpu_generic/pipeline.py: sampling/sort dispatch, legalize, lowering)
        with FuseTransposeMatmul first (so a linear never copies W.T per call) and every dense `x @ W.T` scheduled
        by `schedule_dense_rows`. No FuseOps: our VQ kernels keep their own schedules, and the remaining
        element-wise ops are O(hidden) per token."""
        return [
            relax.transform.FuseTransposeMatmul(),
            # dispatch: sampling and sort/scan ops to their CPU implementations
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            # legalize, then schedule the dense matmuls (no fusion)
            relax.transform.LegalizeOps(),
            schedule_dense_pass(vector_lanes(self.target)),
            # lower dataflow to VM calls, memory planning, VM lowering
            *vm_lowering_passes(),
        ]

    def abi(self) -> dict[str, Any]:
        """The CPU the code needs (package/select.py matches it against the host's /proc/cpuinfo)."""
        return {"machine": self.arch.machine, "cpu_features": list(self.arch.features),
                "mcpu": str(self.target.attrs.get("mcpu", "generic"))}
