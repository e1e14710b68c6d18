"""What a compile target is: one `TargetBackend` per library to build, one module per target kind
(compile/cpu.py: llvm, compile/cuda.py, compile/rocm.py; `compile/targets.py:resolve_backend` makes them).

Everything that differs between targets lives on the backend, so the build (compile/build.py), packaging and
benchmarks ask it instead of checking the target's kind: the TVM target and archs, the set-up before codegen
(`prepare`), the VQ kernel family, the static decode batches, whether CUDA graphs / the device sampler /
code-sorted tensors apply, and the relax pipeline as one list of passes (`passes`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import tvm
from tvm.target import Target

from vptq_mlc.artifact.vq_layout import LAYOUT
from vptq_mlc.tir_kernels.registry import KernelSelector, NormBiasKernels


def gpu_default_schedule() -> tvm.transform.Pass:
    """dlight's GPU rules for whatever is not hand-scheduled (it skips `tirx.is_scheduled` functions)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                   dl.gpu.Fallback())


def vm_lowering_passes(cuda_graph: bool = False) -> list[tvm.transform.Pass]:
    """The tail every target's pipeline ends with, in TVM's order: dataflow to VM calls, memory planning (then
    `RewriteCUDAGraph` when `cuda_graph`: it lifts planned static regions into graphs), VM lowering; then each
    weight's fetch from the parameter tuple moved to its first use (compile/param_fetch.py)."""
    from tvm import relax

    from vptq_mlc.compile.param_fetch import fetch_params_at_first_use

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        *([relax.transform.RewriteCUDAGraph()] if cuda_graph else []),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        fetch_params_at_first_use(),
        relax.transform.AttachGlobalSymbol(),
    ]


def split_archs(arch: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """`--arch a,b` -> ("a", "b"); the backend's defaults when none is given."""
    return tuple(a.strip() for a in arch.split(",") if a.strip()) if arch else default


class TargetBackend(ABC):
    """One library to build for one target: `kind` is the `--target` name (and `_metadata["target"]` kind),
    `label` the file-name tag ("llvm-znver4", "cuda", "rocm-gfx90a"), `archs` what the library holds code for."""

    kind: ClassVar[str]
    # `relax.backend.use_cuda_graph` applies (RewriteCUDAGraph is in the pipeline), and is on by default
    cuda_graph: ClassVar[bool] = False
    # the library gets `sample_tokens` (compile/sampler.py); otherwise sampling is on the host
    has_sampler: ClassVar[bool] = True
    # the decode kernels read the code-sorted tensor-cache entries (compile adds them to the model dir)
    code_sorted_tensors: ClassVar[bool] = False
    # dtype of the logits matmul's sum (None: the model's dtype)
    logits_dtype: ClassVar[str | None] = None
    # its VQ kernels read codebooks stored narrower than the model dtype (ChatConfig.codebook_dtype)
    narrow_codebooks: ClassVar[bool] = False
    # prefill tokens per call the library is built for when the model dir asks for fewer (0: the model dir's):
    # a GPU whose long-prompt prefill has a fixed cost per call (e.g. dequantizing every VQ layer once) wants
    # prompts in few, long calls; the engine still mixes short chunks into decode steps while others decode
    default_prefill_chunk: ClassVar[int] = 0
    # TVM's paged KV cache has MLA (latent) kernels here: `compile --kv-cache mla` may build deepseek_v3 on it
    latent_kv_cache: ClassVar[bool] = False

    def __init__(self, target: Target, label: str, archs: tuple[str, ...] = ()):
        self.target = target
        self.label = label
        self.archs = archs

    @classmethod
    @abstractmethod
    def resolve(cls, arch: str | None) -> list[TargetBackend]:
        """The libraries `--arch` asks for (None: the backend's defaults); one-line CompileError on a bad arch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, archs={self.archs})"

    # ---- before codegen ----------------------------------------------------------------------------------------
    def prepare(self) -> None:  # noqa: B027 - most targets need no set-up; not abstract on purpose
        """Set TVM up to generate this target's code on this machine (toolchain callbacks); idempotent."""

    @property
    def metadata(self) -> dict[str, Any]:
        """`_metadata["target"]`: what the library needs of its host (empty: nothing beyond the device kind)."""
        return {}

    # ---- the model's kernels -----------------------------------------------------------------------------------
    @abstractmethod
    def kernel_selector(self, layouts: Iterable[str] = (LAYOUT,)) -> KernelSelector:
        """The VQ kernel family (tir_kernels/registry.py); `layouts`: the kernel layouts the model dir carries."""

    def norm_bias_kernels(self) -> NormBiasKernels | None:
        """Hand-scheduled norm-bias kernels, or None to let the relax pipeline schedule the plain reduction."""
        return None

    @property
    def static_decode_batches(self) -> tuple[int, ...]:
        """Batch sizes worth a static `batch_decode_b<n>` function (those with a dedicated decode kernel)."""
        return ()

    # ---- lowering and codegen ----------------------------------------------------------------------------------
    @abstractmethod
    def passes(self) -> list[tvm.transform.Pass]:
        """The relax pipeline, in order (run inside the target's scope by `relax_pipeline`)."""

    def relax_pipeline(self) -> tvm.transform.Pass:
        """`passes()` as one module pass that enters the target (dispatch and dlight read `Target.current()`). The
        passes are built here, before the pipeline runs: what building them checks (compile switches read from the
        environment) then fails as our one-line error, not inside a TVM pass, whose errors come out as tracebacks."""
        target, name = self.target, f"VPTQ{type(self).__name__}Pipeline"
        with target:
            passes = self.passes()

        @tvm.transform.module_pass(opt_level=0, name=name)
        def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
            with target:
                return tvm.transform.Sequential(passes)(mod)

        return pipeline

    def codegen_note(self) -> str:
        """Said next to "generating code" in the progress lines."""
        return ""

    # ---- packaging ---------------------------------------------------------------------------------------------
    @abstractmethod
    def abi(self) -> dict[str, Any]:
        """What a prebuilt package's manifest records for a host to match the library against."""

    def library_archs(self, path: Path) -> list[str] | None:
        """The archs a built library holds code for, read from the file (None: nothing to check)."""
        return None
