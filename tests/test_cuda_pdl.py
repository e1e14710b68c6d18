"""Programmatic dependent launch of the decode VQ kernels (VPTQ_MLC_PDL, compile/cuda_pdl.py), on the build box.

What must hold for it to be safe: a kernel launched that way waits for the previous kernel before it reads an
activation or writes anything, and only kernels that wait are launched that way. Checked here on the CUDA source TVM
generates (no GPU): the wait comes after the codebook copy and before the first activation read, in the GEMV and in
the whole-entry tensor-core kernel, and the two-launch prologue triggers then waits first; the pipeline tags exactly
the kernels that call the wait, and the tag reaches the library nvcc links. Whether it pays is an H100 measurement.
"""

from __future__ import annotations

import re

import pytest
from cuda_sources import generated_cuda, kernel_definitions

from vptq_mlc.errors import CompileError


def _cfg(variant: str, i: int, o: int):
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

    return VPTQLayerConfig.from_variant(variant, i, o, enable_norm=True)


def _target(arch: str):
    from tvm.target import Target

    return Target({"kind": "cuda", "arch": arch})


def test_switch_and_arch_gate(monkeypatch) -> None:
    """Off by default; on, only where the build's lowest arch has griddepcontrol (sm_90+); bad values refused."""
    from vptq_mlc.tir_kernels.registry import PDL_ENV, pdl_for_target

    monkeypatch.delenv(PDL_ENV, raising=False)
    assert not pdl_for_target(_target("sm_90a"))
    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl_for_target(_target("sm_90a")) and pdl_for_target(_target("sm_90"))
    assert not pdl_for_target(_target("sm_80")) and not pdl_for_target(_target("sm_89"))
    monkeypatch.setenv(PDL_ENV, "maybe")
    with pytest.raises(CompileError, match=PDL_ENV):
        pdl_for_target(_target("sm_90a"))


def _first(lines: list[str], pattern: str) -> int:
    """Index of the first line after the signature that matches `pattern`."""
    return next(i for i, line in enumerate(lines) if i and re.search(pattern, line))


@pytest.fixture(scope="module")
def sources():
    """name -> CUDA of each kernel of the two-launch GEMV (batch 1) and tensor-core (16 rows) forms, and of the
    plain ones, built with pdl."""
    import tvm

    from vptq_mlc.tir_kernels.cuda_gemv import vq_gemv_cuda
    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, vq_mma_wide_cuda
    from vptq_mlc.tir_kernels.fused_input import FusedInput

    qkv, big = _cfg("v8-k4096-0", 4096, 4096), _cfg("v8-k65536-256", 1024, 512)
    funcs = {
        "gemv_two": vq_gemv_cuda(qkv, "float16", 1, prologue=(True,), fused=FusedInput(residual=True),
                                 two_launch=True, pdl=True),
        "gemv": vq_gemv_cuda(qkv, "float16", 2, pdl=True),
        "wide_two": vq_mma_wide_cuda(qkv, "float16", 16, plan_mma_wide(qkv, 16, True, 3), prologue=(True,) * 3,
                                     fused=FusedInput("rmsnorm", 1e-5, concat=True), pdl=True),
        "wide_l2_book": vq_mma_wide_cuda(big, "float16", 16, pdl=True),
    }
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    return kernel_definitions(generated_cuda(lambda bt: tvm.compile(mod, target=bt.target), "sm_90"))


def test_wait_follows_the_codebook_copy_and_precedes_every_activation_read(sources) -> None:
    """Before the wait a kernel touches weights and shared memory only: the codebook copy comes first, and no
    activation, scratch or output pointer (read or written) appears until the wait."""
    wait = r"cudaGridDependencySynchronize\(\)"
    smem_store = r"(\(\(half\*\)buf_dyn_shmem_ptr\)|wide_book_ptr\[).* = "
    for name in ("gemv_two_kernel_1", "gemv_kernel", "wide_two_kernel_1"):
        lines = sources[name].split("\n")
        first_wait = _first(lines, wait)
        assert _first(lines, smem_store) < first_wait, name
        assert _first(lines, r"\b(xs|xs_\d|y|y_\d|dot_\d|residual)_ptr\b") > first_wait, name
    # a book read through L1/L2: nothing to copy, so the wait comes before any memory access but the codes'
    lines = sources["wide_l2_book_kernel"].split("\n")
    assert _first(lines, wait) < _first(lines, r"\b(xs|y)_ptr\b")


def test_two_launch_prologue_triggers_then_waits_first(sources) -> None:
    """The prologue launch lets the VQ launch start at once, then waits for its own predecessor before reading x."""
    for name in ("gemv_two_kernel", "wide_two_kernel"):
        lines = sources[name].split("\n")
        trigger = _first(lines, r"cudaTriggerProgrammaticLaunchCompletion\(\)")
        assert trigger < _first(lines, r"cudaGridDependencySynchronize\(\)") < _first(lines, r"\bx_ptr\b")


def test_without_the_switch_no_kernel_waits() -> None:
    """pdl off: the generated CUDA has neither call (what every build without VPTQ_MLC_PDL=1 runs)."""
    import tvm

    from vptq_mlc.tir_kernels.cuda_mma_wide import vq_mma_wide_cuda

    f = vq_mma_wide_cuda(_cfg("v8-k4096-0", 1024, 512), "float16", 16).with_attr("global_symbol", "w")
    src = generated_cuda(lambda bt: tvm.compile(tvm.IRModule({"w": f}), target=bt.target), "sm_90")
    assert "cudaGridDependencySynchronize" not in src and "cudaTrigger" not in src


def _two_kernels():
    from tvm.script import tirx as T

    from vptq_mlc.tir_kernels.cuda_common import dependency_wait

    @T.prim_func(private=True)
    def func(a: T.Buffer((1024,), "float32"), b: T.Buffer((1024,), "float32"), c: T.Buffer((1024,), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.launch_thread("blockIdx.x", 8) as bx:
            with T.launch_thread("threadIdx.x", 128) as tx:
                b[bx * 128 + tx] = a[bx * 128 + tx] + T.float32(1)
        with T.launch_thread("blockIdx.x", 8) as bx:
            with T.launch_thread("threadIdx.x", 128) as tx:
                dependency_wait(True)
                c[bx * 128 + tx] = b[bx * 128 + tx] * T.float32(2)

    return func.with_attr("global_symbol", "two")


def test_pipeline_tags_exactly_the_kernels_that_wait() -> None:
    """TVM's pipeline + the tagging pass: the second kernel (which waits) gets the launch tag first in its launch
    parameters, the first keeps TVM's parameters as they were."""
    import tvm

    from vptq_mlc.compile.cuda_pdl import LAUNCH_PARAMS_ATTR, PDL_LAUNCH_TAG, PDL_PIPELINE

    mod = tvm.IRModule({"two": _two_kernels()})
    mod = tvm.tirx.transform.BindTarget(_target("sm_90a").with_host("llvm"))(mod)
    pipeline, _, _ = tvm.tirx.get_tir_pipeline(PDL_PIPELINE)
    params = {gv.name_hint: list(f.attrs[LAUNCH_PARAMS_ATTR]) for gv, f in pipeline(mod).functions.items()
              if f.attrs and LAUNCH_PARAMS_ATTR in f.attrs}
    assert params == {"two_kernel": ["blockIdx.x", "threadIdx.x"],
                      "two_kernel_1": [PDL_LAUNCH_TAG, "blockIdx.x", "threadIdx.x"]}


def test_the_tag_reaches_the_linked_library(tmp_path, monkeypatch) -> None:
    """nvcc-built library of an sm_90 build with the switch: the CUDA module's function table carries the tag
    (the runtime reads it at load); the CUDA backend picks the pipeline only with the switch on."""
    from test_cuda_aot import require_cuda_toolkit

    require_cuda_toolkit(cuobjdump=False)
    import tvm

    from vptq_mlc.compile.cuda_pdl import PDL_LAUNCH_TAG
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.registry import PDL_ENV

    monkeypatch.setenv(PDL_ENV, "0")
    (bt,) = resolve_backend("cuda", "sm_90")
    assert bt.tir_pipeline == "default"
    monkeypatch.setenv(PDL_ENV, "1")
    bt.prepare()
    lib = tvm.tirx.build(tvm.IRModule({"two": _two_kernels()}), target=bt.target, pipeline=bt.tir_pipeline)
    lib.export_library(str(tmp_path / "two.so"))
    assert (tmp_path / "two.so").read_bytes().count(PDL_LAUNCH_TAG.encode()) == 1
