"""The CUDA target backend (`CudaBackend`): one library whose kernels are SASS for every requested arch (nvcc
fatbin), built ahead of time on a box with no GPU and no driver (docs/gpu-aot.md §2).

Why the set-up is needed: TVM compiles CUDA source to binary at build time only when its CUDA runtime plugin
(`libtvm_runtime_cuda.so`) is loaded, and that plugin links `libcuda.so.1` (the driver). On a driverless box
we satisfy it with a stub libcuda (every entry point returns CUDA_ERROR_STUB_LIBRARY) that is loaded at
build time only, never shipped. The compile callback then runs nvcc once with one `-gencode` per arch.
Code is generated for the lowest arch so one source is valid for all of them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tvm
from tvm import relax, tirx

from vptq_mlc.artifact.vq_layout import LAYOUT
from vptq_mlc.cache import cache_root
from vptq_mlc.compile.backend import TargetBackend, gpu_default_schedule, split_archs, vm_lowering_passes
from vptq_mlc.errors import CompileError
from vptq_mlc.tir_kernels.cuda_attention_decode import decode_attn_pass
from vptq_mlc.tir_kernels.cuda_attention_split_kv import split_kv_prefill_pass
from vptq_mlc.tir_kernels.cuda_dense_mma import dense_mma_pass
from vptq_mlc.tir_kernels.cuda_wgmma import WGMMA_ARCH, WGMMA_ENV, wgmma_for_target, wgmma_setting
from vptq_mlc.tir_kernels.registry import (
    CUDA_MMA_ONLY_BATCHES,
    CudaKernelSelector,
    KernelSelector,
    NormBiasKernels,
    gemv_decode_batches,
    norm_bias_kernels,
)

log = logging.getLogger(__name__)

# Driver entry points libtvm_runtime_cuda.so imports (nm -D --undefined-only); all fail when called.
_STUB_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled", "cuInit",
    "cuDriverGetVersion", "cuGetProcAddress",
)
_ARCH_RE = re.compile(r"^sm_(\d+)([a-z]?)$")
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
_STATE: dict[str, object] = {}


def parse_archs(archs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate `sm_XX` names, sort by compute capability (lowest first), drop duplicates."""
    out = []
    for a in archs:
        a = a.strip().lower()
        if not _ARCH_RE.match(a):
            raise CompileError(f"bad CUDA arch {a!r}; use names like sm_80,sm_86,sm_89,sm_90")
        if a not in out:
            out.append(a)
    if not out:
        raise CompileError("no CUDA arch given; pass --arch sm_80,sm_90 (or leave --arch out for the defaults)")
    return tuple(sorted(out, key=lambda s: int(_ARCH_RE.match(s).group(1))))


def find_nvcc() -> str:
    """nvcc from PATH, else $CUDA_HOME/bin (the build needs it; the GPU host does not)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if root and (Path(root) / "bin" / "nvcc").exists():
                return str(Path(root) / "bin" / "nvcc")
        raise CompileError("nvcc not found; install the CUDA toolkit (13.x) and put its bin/ on PATH or set CUDA_HOME")
    return nvcc


def _stub_libcuda(cache: Path) -> Path:
    """Compile (once) a libcuda.so.1 whose entry points all return CUDA_ERROR_STUB_LIBRARY (34)."""
    so = cache / "libcuda.so.1"
    if so.exists():
        return so
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "stub_libcuda.c"
    src.write_text(
        "/* build-time stand-in for the NVIDIA driver: never ship, never install on a GPU host */\n"
        + "".join(f"int {s}(void) {{ return 34; }}\n" for s in _STUB_SYMBOLS)
    )
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise CompileError("a C compiler (cc/gcc) is needed to build the CUDA library; install gcc")
    tmp = cache / f".libcuda.{os.getpid()}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)], check=True)
    os.replace(tmp, so)
    return so


def _load_cudart() -> None:
    """libtvm_runtime_cuda.so also needs libcudart.so.13; take it from the toolkit if the loader cannot."""
    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    nvcc = Path(find_nvcc()).resolve()
    for d in (nvcc.parent.parent / "lib64", nvcc.parent.parent / "lib"):
        for f in sorted(d.glob("libcudart.so.13*")):
            ctypes.CDLL(str(f), mode=ctypes.RTLD_GLOBAL)
            return
    raise CompileError("libcudart.so.13 not found; install the CUDA 13 toolkit (or pip nvidia-cuda-runtime)")


def _load_cuda_plugin() -> None:
    """Make TVM's CUDA codegen compile at build time: stub driver + cudart, then the runtime plugin."""
    if _STATE.get("plugin"):
        return
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD)
        have_driver = True
    except OSError:
        have_driver = False
    if not have_driver:
        try:  # a real driver on the build box is fine too
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            cache = cache_root()
            ctypes.CDLL(str(_stub_libcuda(cache)), mode=ctypes.RTLD_GLOBAL)
            log.info("loaded the build-time libcuda stub (no NVIDIA driver on this machine)")
    _load_cudart()
    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        rt_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        ctypes.CDLL(str(rt_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise CompileError(
            "TVM's CUDA plugin did not register; reinstall apache-tvm 0.27 (it ships libtvm_runtime_cuda.so)"
        )
    _STATE["plugin"] = True


def wgmma_archs(archs: tuple[str, ...]) -> tuple[str, ...]:
    """The arch list of a build with the wgmma prefill GEMM (`VPTQ_MLC_WGMMA=1`): sm_90a code, which loads on
    sm_90 GPUs only, so the build must ask for sm_90 alone."""
    if any(a not in ("sm_90", WGMMA_ARCH) for a in archs):
        raise CompileError(f"{WGMMA_ENV}=1 builds {WGMMA_ARCH} code, which runs on sm_90 GPUs only: pass --arch sm_90 "
                           f"(got {','.join(archs)}), or set {WGMMA_ENV}=0")
    return (WGMMA_ARCH,)


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    flags: list[str] = []
    for a in archs:
        cc = _ARCH_RE.match(a)
        num = cc.group(1) + cc.group(2)
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def nvcc_threads(archs: tuple[str, ...]) -> list[str]:
    """nvcc compiles each arch's code (cicc, then ptxas) on its own; `--threads` runs them side by side, one per arch
    up to the host's CPUs (two archs of a tiny fp16 model on 2 cores: 154 -> 128 s)."""
    n = min(len(archs), os.cpu_count() or 1)
    return ["--threads", str(n)] if n > 1 else []


def _install_fatbin_callback(archs: tuple[str, ...]) -> None:
    """Override TVM's compile callback: one nvcc run -> fatbin with SASS for every arch (no PTX)."""
    from tvm.support import nvcc as tvm_nvcc

    nvcc_dir = str(Path(find_nvcc()).parent)
    lowest = tvm.target.Target({"kind": "cuda", "arch": archs[0]})

    def compile_fatbin(code: str) -> bytearray:
        if os.pathsep + nvcc_dir not in os.pathsep + os.environ.get("PATH", ""):
            os.environ["PATH"] = nvcc_dir + os.pathsep + os.environ.get("PATH", "")
        dump = os.environ.get("VPTQ_MLC_CUDA_DUMP")  # debugging: keep the generated CUDA source
        if dump:
            Path(dump).write_text(code)
        with lowest:  # compile_cuda reads Target.current() for flags
            return tvm_nvcc.compile_cuda(
                code, target_format="fatbin", arch=gencode_flags(archs), compiler="nvcc", options=nvcc_threads(archs)
            )

    tvm.register_global_func("tvm_callback_cuda_compile", compile_fatbin, override=True)


def prepare_cuda_build(archs: tuple[str, ...]) -> None:
    """Everything the CUDA build needs before tvm.compile (idempotent; re-installs the callback per arch set)."""
    find_nvcc()
    _load_cuda_plugin()
    _install_fatbin_callback(archs)


def cuda_target(arch: str) -> tvm.target.Target:
    """A full CUDA target for codegen; limits are the lowest common ones of sm_80..sm_90 (dlight reads them)."""
    return tvm.target.Target(
        {
            "kind": "cuda",
            "arch": arch,
            "max_num_threads": 1024,
            "max_threads_per_block": 1024,
            "max_shared_memory_per_block": 49152,
            "thread_warp_size": 32,
            "registers_per_block": 65536,
        }
    )


@tvm.transform.module_pass(opt_level=0, name="VPTQNoTensorize")
def no_tensorize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """`dlight.do_not_tensorize` on every function: dlight's tensor-core rule's Tensorize step segfaults in
    apache-tvm 0.27.0.post1 on fp16 matmuls larger than 64 (seen on lm_head / attention projections), so matmuls
    get dlight's SIMT tiled schedule instead."""
    funcs = {
        gv: f.with_attr("dlight.do_not_tensorize", True) if isinstance(f, tirx.PrimFunc) else f
        for gv, f in mod.functions.items()
    }
    return tvm.IRModule(funcs, attrs=mod.attrs)


class CudaBackend(TargetBackend):
    """`--target cuda --arch ...`: one library for every arch (codegen for the lowest, nvcc fatbin for all),
    CUDA graphs on by default, the code-sorted decode kernels for large codebooks, the MLA cache for deepseek_v3
    (`--kv-cache mla`)."""

    kind = "cuda"
    cuda_graph = True
    code_sorted_tensors = True
    # A VQ prefill call of >= 128 rows dequantizes each layer once (tir_kernels/cuda_dequant_gemm.py), so 2048-token
    # calls save three passes over the weights for a 2048-token prompt: measured on an H100 (Llama-2-7B shape, one
    # run), 2047-token prefill 1.24x faster for v8-k4096-0 and 1.11x for the fp16 build, 512 tokens and decode
    # unchanged, +142 MiB peak memory (bench/RESULTS.md). Capped at the context window.
    default_prefill_chunk = 2048
    latent_kv_cache = True

    def __init__(self, archs: tuple[str, ...]):
        super().__init__(cuda_target(archs[0]), "cuda", archs)

    @classmethod
    def resolve(cls, arch: str | None) -> list[TargetBackend]:
        archs = parse_archs(split_archs(arch, DEFAULT_CUDA_ARCHS))
        wgmma = wgmma_setting()
        if wgmma or (wgmma is None and archs == ("sm_90",)):  # unset: sm_90-only builds take wgmma
            archs = wgmma_archs(archs)
        return [cls(archs)]

    def prepare(self) -> None:
        prepare_cuda_build(self.archs)

    def kernel_selector(self, layouts: Iterable[str] = (LAYOUT,)) -> KernelSelector:
        return CudaKernelSelector(self.target, layouts)

    def norm_bias_kernels(self) -> NormBiasKernels:
        return norm_bias_kernels(prologue=True)

    @property
    def static_decode_batches(self) -> tuple[int, ...]:
        return gemv_decode_batches() + CUDA_MMA_ONLY_BATCHES

    def passes(self) -> list[tvm.transform.Pass]:
        """TVM's CUDA pipeline (relax/backend/cuda/pipeline.py) with four changes: the paged KV cache's prefill
        attention replaced by ours that splits the cached length for short chunks (tir_kernels/
        cuda_attention_split_kv.py; tensor cores for long chunks and the ragged prefill, cuda_attention_mma.py),
        FuseTransposeMatmul first (as the llvm pipeline does), dense fp16 NT matmuls
        (lm_head, every linear of an fp16 model) replaced after legalization by our tensor-core GEMM
        (tir_kernels/cuda_dense_mma.py), and dlight's tensor-core rule off (`no_tensorize`): other matmuls get
        dlight's SIMT tiled schedule."""
        return [
            split_kv_prefill_pass(),  # TIRPagedKVCache's prefill kernel -> ours (same signature, already scheduled)
            # its decode kernel -> ours split over the cached length (VPTQ_MLC_DECODE_ATTN=0: no change)
            decode_attn_pass(),
            # dispatch: sampling and sort/scan ops to their GPU implementations
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            # x @ W.T as one NT matmul: without it every dense linear (lm_head, and all of a dense fp16 model)
            # materialises W.T through a transpose kernel on every call (seen as transpose*_kernel in the library)
            relax.transform.FuseTransposeMatmul(),
            # legalize and fuse (our VQ kernels are kOpaque: never fused)
            relax.transform.LegalizeOps(),
            # fp16 x @ W.T -> our tensor-core GEMM (opaque: FuseOps leaves it alone); wgmma for long prompts in
            # sm_90a builds (sm_90 alone, VPTQ_MLC_WGMMA not 0)
            dense_mma_pass(wgmma=wgmma_for_target(self.target)),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            # schedule what is not hand-scheduled (dlight skips `tirx.is_scheduled` functions: our VQ kernels and
            # dense_mma_pass's GEMMs)
            no_tensorize,
            gpu_default_schedule(),
            # lower dataflow to VM calls, memory planning, CUDA graphs (`relax.backend.use_cuda_graph`), VM lowering
            *vm_lowering_passes(cuda_graph=True),
        ]

    def codegen_note(self) -> str:
        return f" (one nvcc run for {', '.join(self.archs)})"

    def abi(self) -> dict[str, Any]:
        return {"cuda_runtime": "libcudart.so.13", "code": "sass"}

    def library_archs(self, path: Path) -> list[str]:
        from vptq_mlc.compile.fatbin import inspect_library

        return list(inspect_library(path).archs)
