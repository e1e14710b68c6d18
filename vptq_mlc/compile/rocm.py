"""The ROCm target backend (`RocmBackend`): one library per gfx arch, its kernels an HSA code object (HSACO)
compiled ahead of time on a box with no AMD GPU (docs/gpu-aot.md §4).

What TVM 0.27 needs and why we set it up here:
- Device-library bitcode (`ocml`, `oclc_*`) from `<ROCM_PATH>/amdgcn/bitcode`. Debian's `rocm-device-libs`
  puts it under the multiarch library folder, so ROCM_PATH must point there.
- A linker that understands the code object TVM's LLVM (22) emits. TVM looks for `ld.lld-22`, then `ld.lld`,
  checking /bin before PATH, so Debian's lld 14 (or nothing) wins; we pin the newest versioned `ld.lld-N`.
- The code object version. LLVM 22 emits v6 by default, which ROCm's loader accepts only from ROCm 6.2
  (ROCR-Runtime rocm-6.2.0: `majorVersion > 6`; rocm-5.2.0 .. 6.1.x reject anything above 5). We emit v5 by
  default (ROCm >= 5.2 loads it), by linking one extra IR file that sets the module flag
  `amdhsa_code_object_version` = 500 next to the device libraries (TVM's rocm target has no option for it).
- Wavefront size. CDNA (gfx9) runs wave64; RDNA (gfx10/11/12) compiles wave32 by default, so the target's
  `thread_warp_size` must say 32 there or warp-level reductions would assume 64 lanes.
- Threads per block. TVM marks every kernel `amdgpu-flat-work-group-size=1,256` when it cannot query a GPU
  (always, on a build box), so schedules must not use more than 256 threads per block.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from vptq_mlc.artifact.vq_layout import LAYOUT
from vptq_mlc.atomic import atomic_file
from vptq_mlc.cache import cache_root
from vptq_mlc.compile.backend import TargetBackend, gpu_default_schedule, split_archs, vm_lowering_passes
from vptq_mlc.errors import CompileError
from vptq_mlc.tir_kernels.cuda_gemv import wavefront_params
from vptq_mlc.tir_kernels.registry import (
    KernelSelector,
    NormBiasKernels,
    WavefrontKernelSelector,
    gemv_decode_batches,
    norm_bias_kernels,
    rocm_mfma_enabled,
)
from vptq_mlc.tir_kernels.rocm_dense_mfma import dense_mfma_pass, mfma_arch

log = logging.getLogger(__name__)

# Code object version -> oldest ROCm whose loader accepts it (ROCR-Runtime src/loader/executable.cpp: release
# tags rocm-5.2.0 .. rocm-6.1.2 accept versions up to 5, rocm-6.2.0 and later up to 6).
MIN_ROCM_FOR_CODE_OBJECT = {5: (5, 2), 6: (6, 2)}
DEFAULT_CODE_OBJECT_VERSION = 5
# Oldest lld that links each version: here lld 15 and 19 linked v5, lld 14 rejected it ("unknown abi version");
# v6 first appeared in LLVM 18 (lld 19 checked).
_MIN_LLD_FOR_CODE_OBJECT = {5: 15, 6: 18}
# Oldest ROCm whose loader knows the ISA (ROCR-Runtime src/core/runtime/isa.cpp; release tags from 5.0.0 checked).
MIN_ROCM_FOR_ARCH = {"gfx90a": (5, 0), "gfx942": (5, 7), "gfx1100": (5, 3)}
DEFAULT_ROCM_ARCHS = ("gfx90a", "gfx942", "gfx1100")

_ARCH_RE = re.compile(r"^gfx(9|10|11|12)[0-9a-f]{1,3}$")
_TRIPLE = "amdgcn-amd-amdhsa-hcc"
_STATE: dict[str, object] = {}


def min_rocm(arch: str, code_object_version: int = DEFAULT_CODE_OBJECT_VERSION) -> str:
    """Oldest ROCm that can load a library for `arch` (ISA known to the loader and code object accepted)."""
    need = max(MIN_ROCM_FOR_ARCH.get(parse_arch(arch), (0, 0)), MIN_ROCM_FOR_CODE_OBJECT[code_object_version])
    return f"ROCm {need[0]}.{need[1]}"


def parse_arch(arch: str) -> str:
    """Validate one `gfx...` name (CDNA gfx9xx or RDNA gfx10xx-12xx)."""
    a = arch.strip().lower()
    if not _ARCH_RE.match(a):
        raise CompileError(f"bad ROCm arch {arch!r}; use gfx names like gfx90a,gfx942,gfx1100")
    return a


def wavefront_size(arch: str) -> int:
    """64 lanes on CDNA/GCN (gfx9), 32 on RDNA (gfx10+), which is what LLVM compiles for by default."""
    return 64 if parse_arch(arch).startswith("gfx9") else 32


def rocm_target(arch: str) -> tvm.target.Target:
    """The TVM target for one gfx arch, with the limits TVM's schedules read (warp size, threads, LDS)."""
    arch = parse_arch(arch)
    return tvm.target.Target(
        {
            "kind": "rocm",
            "mcpu": arch,
            "mtriple": _TRIPLE,
            "thread_warp_size": wavefront_size(arch),
            # TVM's AMDGPU codegen caps every kernel at 256 threads when no GPU is present (see module doc).
            "max_threads_per_block": 256,
            "max_num_threads": 256,
            # 64 KiB of LDS per workgroup on gfx90a/gfx942 and on RDNA3.
            "max_shared_memory_per_block": 65536,
        }
    )


def find_bitcode_dir() -> Path:
    """The folder holding `amdgcn/bitcode` (ROCM_PATH, /opt/rocm, or Debian's multiarch library folder)."""
    roots: list[Path] = []
    for env in ("ROCM_PATH", "HIP_PATH"):
        if os.environ.get(env):
            roots.append(Path(os.environ[env]))
    roots.append(Path("/opt/rocm"))
    roots += sorted(Path("/usr/lib").glob("*-linux-gnu"))  # Debian/Ubuntu rocm-device-libs
    roots.append(Path("/usr/lib"))
    for root in roots:
        if (root / "amdgcn" / "bitcode" / "ocml.bc").exists():
            return root
    raise CompileError(
        "ROCm device libraries (amdgcn/bitcode/ocml.bc) not found; install them "
        "(Debian/Ubuntu: apt-get install rocm-device-libs; or ROCm under /opt/rocm) or set ROCM_PATH"
    )


def _lld_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"LLD (\d+)\.", out)
    return int(m.group(1)) if m else None


def find_ld_lld(code_object_version: int = DEFAULT_CODE_OBJECT_VERSION) -> str:
    """Newest `ld.lld` that can link this code object version: $VPTQ_MLC_LD_LLD, else versioned names."""
    need = _MIN_LLD_FOR_CODE_OBJECT[code_object_version]
    if os.environ.get("VPTQ_MLC_LD_LLD"):
        cands = [os.environ["VPTQ_MLC_LD_LLD"]]
    else:
        names: set[str] = set()
        for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/bin"]:
            names.update(str(p) for p in Path(d).glob("ld.lld-*") if p.is_file())
        names.update(str(p) for p in Path("/usr/lib").glob("llvm-*/bin/ld.lld"))
        names.update(str(p) for p in (Path("/opt/rocm/llvm/bin/ld.lld"), Path("/opt/rocm/lib/llvm/bin/ld.lld")))
        plain = shutil.which("ld.lld")
        if plain:
            names.add(plain)
        cands = sorted(n for n in names if Path(n).exists())
    found = [(v, c) for c in cands if (v := _lld_major(c)) is not None]
    good = sorted((v, c) for v, c in found if v >= need)
    if not good:
        seen = ", ".join(f"{c} (LLD {v})" for v, c in found) or "none"
        raise CompileError(
            f"no ld.lld >= {need} found for ROCm code object v{code_object_version} (seen: {seen}); "
            "install a newer lld (Debian: apt-get install lld-19) or set VPTQ_MLC_LD_LLD"
        )
    return good[-1][1]


def _code_object_ir(version: int, cache: Path) -> Path:
    """A tiny LLVM IR module whose only content is the code object version flag (linked like device libs)."""
    path = cache / f"vptq_code_object_v{version}.ll"
    if not path.exists():
        with atomic_file(path) as tmp:
            tmp.write_text(
                "; sets the AMDHSA code object version of every kernel module it is linked into (vptq-mlc)\n"
                'target triple = "amdgcn-amd-amdhsa"\n'
                "!llvm.module.flags = !{!0}\n"
                f'!0 = !{{i32 1, !"amdhsa_code_object_version", i32 {version * 100}}}\n'
            )
    return path


def prepare_rocm_build(code_object_version: int = DEFAULT_CODE_OBJECT_VERSION):
    """Set up TVM's ROCm codegen for an AOT build on any machine; returns the `tvm` module.

    Idempotent; calling it again with another code object version switches the version for later builds.
    """
    if code_object_version not in MIN_ROCM_FOR_CODE_OBJECT:
        raise CompileError(
            f"ROCm code object v{code_object_version} is not supported; use 5 (ROCm >= 5.2) or 6 (ROCm >= 6.2)"
        )
    root = find_bitcode_dir()
    if os.environ.get("ROCM_PATH") != str(root):
        os.environ["ROCM_PATH"] = str(root)  # what TVM's own bitcode lookup reads
    lld = find_ld_lld(code_object_version)
    cache = cache_root()
    cov_ir = _code_object_ir(code_object_version, cache / "rocm")

    import tvm_ffi
    from tvm.support import rocm as tvm_rocm

    bitcode_dir = str(root / "amdgcn" / "bitcode")

    def bitcode_files(rocdl_dir: str | None = None):
        files = list(tvm_rocm.callback_rocm_bitcode_path(rocdl_dir or bitcode_dir))
        return tvm.runtime.convert(files + [str(cov_ir)])

    def link(obj_bin) -> bytearray:
        with tempfile.TemporaryDirectory(prefix="vptq-rocm-link-") as d:
            obj, hsaco = os.path.join(d, "kernels.o"), os.path.join(d, "kernels.hsaco")
            with open(obj, "wb") as f:
                f.write(bytes(obj_bin))
            tvm_rocm.rocm_link(obj, hsaco, lld=lld)  # TVM's own link step, with our linker
            with open(hsaco, "rb") as f:
                return bytearray(f.read())

    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_files, override=True)
    tvm_ffi.register_global_func("tvm_callback_rocm_link", link, override=True)
    if _STATE.get("logged") != (str(root), lld, code_object_version):
        log.info("ROCm build: bitcode %s, linker %s, code object v%d", bitcode_dir, lld, code_object_version)
        _STATE["logged"] = (str(root), lld, code_object_version)
    _STATE["code_object_version"] = code_object_version
    return tvm


class RocmBackend(TargetBackend):
    """`--target rocm --arch ...`: one library per gfx arch (TVM embeds one HSACO per library), the CUDA GEMV's TIR
    parameterised for the arch's wavefront and LDS (`cuda_gemv.wavefront_params`)."""

    kind = "rocm"
    latent_kv_cache = True

    def __init__(self, arch: str, code_object_version: int = DEFAULT_CODE_OBJECT_VERSION):
        arch = parse_arch(arch)
        super().__init__(rocm_target(arch), f"rocm-{arch}", (arch,))
        self.code_object_version = code_object_version

    @classmethod
    def resolve(cls, arch: str | None) -> list[TargetBackend]:
        return [cls(a) for a in split_archs(arch, DEFAULT_ROCM_ARCHS)]

    def prepare(self) -> None:
        prepare_rocm_build(self.code_object_version)

    @property
    def mfma(self) -> bool:
        """Symbolic-row fp16 matmuls on the MFMA GEMM (tir_kernels/rocm_dense_mfma.py): CDNA archs, when
        VPTQ_MLC_ROCM_MFMA=1 at compile time (off by default: never run on AMD hardware)."""
        return mfma_arch(self.archs[0]) and rocm_mfma_enabled()

    def kernel_selector(self, layouts: Iterable[str] = (LAYOUT,)) -> KernelSelector:
        return WavefrontKernelSelector(self.target, wavefront_params(self.target), layouts, mfma=self.mfma)

    def norm_bias_kernels(self) -> NormBiasKernels:
        return norm_bias_kernels(prologue=False)

    @property
    def static_decode_batches(self) -> tuple[int, ...]:
        return gemv_decode_batches()

    def passes(self) -> list[tvm.transform.Pass]:
        """TVM's ROCm pipeline (relax/backend/rocm/pipeline.py); with `mfma`, as on CUDA, FuseTransposeMatmul
        first and dense fp16 NT matmuls of symbolic rows replaced by the MFMA GEMM after legalization."""
        mfma = self.mfma
        return [
            # dispatch: sampling and sort/scan ops to their GPU implementations
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            # x @ W.T as one NT matmul, the form the MFMA GEMM replaces
            *([relax.transform.FuseTransposeMatmul()] if mfma else []),
            # legalize and fuse (our VQ kernels are kOpaque: never fused)
            relax.transform.LegalizeOps(),
            *([dense_mfma_pass()] if mfma else []),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            # schedule what is not hand-scheduled (`tirx.is_scheduled` kernels are skipped)
            gpu_default_schedule(),
            # lower dataflow to VM calls, memory planning, VM lowering
            *vm_lowering_passes(),
        ]

    def abi(self) -> dict[str, Any]:
        return {"code_object_version": self.code_object_version,
                "min_rocm": min_rocm(self.archs[0], self.code_object_version)}

    def library_archs(self, path: Path) -> list[str]:
        from vptq_mlc.compile.hsaco import inspect_library

        return sorted({co.arch for co in inspect_library(path)})
