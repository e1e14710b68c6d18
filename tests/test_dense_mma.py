"""Dense fp16 tensor-core GEMM on CUDA (vptq_mlc/tir_kernels/cuda_dense_mma.py): which PrimFuncs the pipeline
replaces, that the kernels are tensor-core code (mma.sync / ldmatrix / cp.async) for sm_80 and sm_90, and that an fp16
model's CUDA library runs no other matmul. TVM codegen only (CUDA source captured, nvcc not run; tests/test_cuda_aot.py
builds fatbins). The kernel's numbers are checked on the H100 by bench/dense_mma.py (every output row against an fp32
reference). ~40 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from test_cuda_aot import require_cuda_toolkit


def _nt_matmul(lead, n, k, dtype="float16", epilogue=False, transposed=False):
    """x[*lead, k] @ w[n, k]^T as relax legalization writes it (int64 dims), optionally with a bias epilogue or
    with w stored [k, n]."""
    from tvm import te, tirx

    lead = tuple(tirx.IntImm("int64", d) if isinstance(d, int) else d for d in lead)
    n64, k64 = tirx.IntImm("int64", n), tirx.IntImm("int64", k)
    x = te.placeholder(lead + (k64,), dtype, name="x")
    w = te.placeholder((k64, n64) if transposed else (n64, k64), dtype, name="w")
    r = te.reduce_axis((0, k64), name="r")
    if transposed:
        y = te.compute(lead + (n64,), lambda *i: te.sum(x[i[:-1] + (r,)] * w[r, i[-1]], axis=r), name="y")
    else:
        y = te.compute(lead + (n64,), lambda *i: te.sum(x[i[:-1] + (r,)] * w[i[-1], r], axis=r), name="y")
    if epilogue:
        b = te.placeholder((n64,), dtype, name="b")
        z = te.compute(lead + (n64,), lambda *i: y(*i) + b[i[-1]], name="z")
        return te.create_prim_func([x, w, b, z])
    return te.create_prim_func([x, w, y])


def test_matcher_takes_plain_fp16_nt_matmuls_only():
    from tvm import tirx

    from vptq_mlc.tir_kernels.cuda_dense_mma import match_nt_matmul

    seq = tirx.Var("seq_len", "int64")
    lead, n, k = match_nt_matmul(_nt_matmul((1, seq), 96, 64))
    assert (lead[0], lead[1].same_as(seq), n, k) == (1, True, 96, 64)
    assert match_nt_matmul(_nt_matmul((12, 1), 320, 64)) == ((12, 1), 320, 64)
    assert match_nt_matmul(_nt_matmul((4, 1), 96, 64, dtype="float32")) is None
    assert match_nt_matmul(_nt_matmul((4, 1), 96, 64, epilogue=True)) is None
    assert match_nt_matmul(_nt_matmul((4, 1), 96, 64, transposed=True)) is None


def test_plans_fit_shared_memory_and_k():
    from vptq_mlc.tir_kernels import cuda_dense_mma as dm

    for plan in (dm.DECODE_WIDE_PLAN, dm.DECODE_PLAN, dm.SMALL_PREFILL_PLAN, dm.PREFILL_PLAN, dm.PREFILL_PLAN_BK32):
        assert plan.smem_bytes() <= dm.MAX_DYN_SMEM, plan
    for rows in (1, 8, 16, None):
        for k in (64, 4096, 11008, 14336, 53248):
            p = dm.plan_dense(rows, k)
            assert p is not None and k % p.block_k == 0, (rows, k, p)
    assert dm.plan_dense(None, 4100) is None  # K not a multiple of 32: left to dlight
    assert dm.small_prefill_rows(4096) == 128 and dm.small_prefill_rows(11008) == 0


def _cuda_sources(build) -> str:
    """The CUDA source TVM generates inside `build()` (the nvcc callback is replaced by a recorder)."""
    import tvm

    from vptq_mlc.compile.cuda import build_target

    bt = build_target(("sm_80", "sm_90"))
    bt.prepare()
    sources: list[str] = []
    previous = tvm.get_global_func("tvm_callback_cuda_compile")
    tvm.register_global_func(
        "tvm_callback_cuda_compile", lambda code, *_: (sources.append(str(code)), b"-")[1], override=True
    )
    try:
        build(dataclasses.replace(bt, prepare=lambda: None))
    finally:
        tvm.register_global_func("tvm_callback_cuda_compile", previous, override=True)
    (src,) = sources
    return src


def _kernels(src: str) -> dict[str, str]:
    parts = re.split(r'(?=^extern "C" __global__)', src, flags=re.M)[1:]
    out = {}
    for part in parts:
        name = re.search(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", part).group(1)
        if "{" in part.split("\n", 1)[0]:  # the definition, not the forward declaration
            out[name] = part
    return out


def test_kernels_are_tensor_core_code():
    require_cuda_toolkit(cuobjdump=False)
    import tvm
    from tvm import tirx

    from vptq_mlc.tir_kernels.cuda_dense_mma import dense_mma_cuda

    funcs = {
        "dense_r1": dense_mma_cuda((1, 1), 4096, 4096),
        "dense_r16": dense_mma_cuda((16, 1), 11008, 4096),
        "dense_sym": dense_mma_cuda((1, tirx.Var("seq_len", "int64")), 4096, 11008),
    }
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    kernels = _kernels(_cuda_sources(lambda bt: tvm.compile(mod, target=bt.target)))
    # symbolic rows: decode (<= 16 rows), 64 x 64 tiles (short prompts on a 4096-wide output), 128 x 128 tiles
    assert sorted(kernels) == ["dense_r16_kernel", "dense_r1_kernel", "dense_sym_kernel", "dense_sym_kernel_1",
                               "dense_sym_kernel_2"]
    for name, code in kernels.items():
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in code, name
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in code, name
        assert "cp_async_cg_async_cg_shared_global_16" in code and "wait_group" in code, name


def test_fp16_model_runs_every_matmul_on_the_dense_kernel(tmp_path, monkeypatch):
    """An fp16 build (no VPTQ layers: what `bench e2e` calls the fp16 system): every matmul of more than one static
    row runs our kernel (the 1-row decode matmuls keep dlight's GEMV, `DLIGHT_GEMV_ROWS`); attention and the other
    ops keep their kernels."""
    require_cuda_toolkit(cuobjdump=False)
    import vptq_mlc.compile.build as build_mod
    from vptq_mlc.compile.build import build_library
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-256", hidden_size=64,
                                     intermediate_size=128, num_layers=1, vocab_size=320)
    model = convert_checkpoint(ckpt, tmp_path / "mlc", dtype="float16")
    cfg_path = model / "mlc-chat-config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vptq"]["layers"], cfg["quantization"] = {}, "q0f16"  # every linear dense
    cfg_path.write_text(json.dumps(cfg))
    (model / "tensor-cache.json").unlink()  # config-only: the weights no longer match

    lowered = {}
    pipeline = build_mod.relax_pipeline

    def recording_pipeline(target):
        def run(mod):
            lowered["mod"] = pipeline(target)(mod)
            return lowered["mod"]
        return run

    monkeypatch.setattr(build_mod, "relax_pipeline", recording_pipeline)
    kernels = _kernels(_cuda_sources(lambda bt: build_library(model, bt, tmp_path / "fp16-cuda.so")))
    dense = [n for n in kernels if "_dense_mma_kernel" in n]
    assert len(dense) >= 8, sorted(kernels)  # q/k/v/o, gate/up/down, lm_head at several row counts
    assert all("mma.sync.aligned.m16n8k16" in kernels[n] for n in dense)
    left = {gv.name_hint: f for gv, f in lowered["mod"].functions.items()
            if "matmul" in gv.name_hint.lower() and "_dense_mma" not in gv.name_hint and hasattr(f, "params")}
    assert left, "the 1-row decode matmuls should stay with dlight"
    for name, f in left.items():  # x[1, 1, K] @ w[N, K]^T only
        assert [int(d) for d in f.params[0].shape[:-1]] == [1, 1], (name, f.params[0].shape)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
