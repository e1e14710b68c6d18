"""Programmatic dependent launch for the kernels that wait for it: TVM's TIR pipeline plus one pass.

Why: a decode step is hundreds of short kernels, and each VQ kernel starts by copying its codebook into shared
memory, which reads only weights. On sm_90+ a kernel launched with CUDA's programmatic stream serialization may
start while the kernel before it still runs; it must then wait (`griddepcontrol.wait`) before it touches anything
that kernel writes or reads. Our GEMV and whole-entry decode kernels call that wait right after their codebook
copy when built with `pdl` (`tir_kernels/cuda_common.dependency_wait`), and the two-launch form's prologue kernel
lets them start at once (`dependents_trigger_and_wait`).

TVM 0.27's CUDA runtime launches a kernel that way when its launch parameters carry the tag below; its compiler
never adds the tag. So this pipeline runs TVM's default TIR pipeline and then tags exactly the device kernels
whose code calls the wait (any other kernel keeps the plain, fully ordered launch).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from vptq_mlc.tir_kernels.cuda_common import PDL_WAIT

PDL_PIPELINE = "vptq_mlc_cuda_pdl"
# the runtime's launch tag (src/runtime/metadata.h: launch_param::kUseProgramaticDependentLaunch, spelled so)
PDL_LAUNCH_TAG = "tirx.use_programtic_dependent_launch"
LAUNCH_PARAMS_ATTR = "tirx.kernel_launch_params"


def calls_dependency_wait(func: tirx.PrimFunc) -> bool:
    """Whether `func`'s body evaluates the programmatic dependency wait (`cuda_common.PDL_WAIT`) as a statement."""
    call_extern = tvm.ir.Op.get("tirx.call_extern")

    def visit(stmt) -> bool:
        if isinstance(stmt, tirx.Evaluate):
            call = stmt.value
            return (isinstance(call, tvm.ir.Call) and call.op.same_as(call_extern) and
                    isinstance(call.args[0], tvm.ir.StringImm) and call.args[0].value == PDL_WAIT)
        for attr in ("seq", "body", "then_case", "else_case", "block", "init"):
            child = getattr(stmt, attr, None)
            for c in (child if attr == "seq" and child is not None else [child]):
                if isinstance(c, tirx.Stmt) and visit(c):
                    return True
        return False

    return visit(func.body)


def tag_dependent_launches(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` (after host/device splitting) with PDL_LAUNCH_TAG first in the launch parameters of every device
    kernel that calls the wait (the dynamic shared memory tag must stay last)."""
    funcs = {}
    for gv, func in mod.functions.items():
        params = func.attrs.get(LAUNCH_PARAMS_ATTR) if isinstance(func, tirx.PrimFunc) and func.attrs else None
        if params is not None and PDL_LAUNCH_TAG not in params and calls_dependency_wait(func):
            func = func.with_attr(LAUNCH_PARAMS_ATTR, [PDL_LAUNCH_TAG, *params])
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _pipeline_factory():
    base, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="TagDependentLaunches")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return tag_dependent_launches(base(mod))

    return pipeline, finalize_host, finalize_device


tvm.tirx.register_tir_pipeline(PDL_PIPELINE, _pipeline_factory)
