"""Stacked routed experts (artifact/expert_stack.py): which layers stack, what convert writes, and the CUDA source of
the gathered kernel (built with nvcc here; its numbers are checked on a GPU by tests/gpu/test_deepseek_gpu.py, and
the same computation on llvm against transformers by tests/test_architectures.py)."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_sources import generated_cuda, kernel_definitions
from test_cuda_aot import require_cuda_toolkit

from vptq_mlc.artifact.expert_stack import expert_stacks, stacked_members
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

A = VPTQLayerConfig.from_variant("v8-k256-0", 64, 32)
B = VPTQLayerConfig.from_variant("v4-k64-0", 64, 32)
DOWN = VPTQLayerConfig.from_variant("v8-k256-0", 32, 64)


def _layer(prefix: str, experts: int, gate=A, up=A, down=DOWN) -> dict[str, VPTQLayerConfig]:
    out = {}
    for e in range(experts):
        out.update({f"{prefix}.{e}.gate_proj": gate, f"{prefix}.{e}.up_proj": up, f"{prefix}.{e}.down_proj": down})
    return out


def test_stacks_follow_the_configs():
    p1, p2, p3 = (f"model.layers.{i}.mlp.experts" for i in (1, 2, 3))
    layers = {**_layer(p1, 3), **_layer(p2, 2, gate=B), **_layer(p3, 2),
              "model.layers.1.mlp.shared_experts.gate_proj": A, "model.layers.0.mlp.gate_proj": A}
    layers[f"{p3}.1.down_proj"] = VPTQLayerConfig.from_variant("v4-k64-0", 32, 64)  # one expert differs
    stacks = expert_stacks(layers)
    assert sorted(stacks) == [f"{p1}.down_proj", f"{p1}.gate_up_proj", f"{p2}.down_proj", f"{p2}.gate_proj",
                              f"{p2}.up_proj"]
    assert stacks[f"{p1}.gate_up_proj"].members == tuple(
        f"{p1}.{e}.{n}" for e in range(3) for n in ("gate_proj", "up_proj"))
    assert stacks[f"{p2}.gate_proj"].cfg == B and stacks[f"{p2}.up_proj"].cfg == A
    assert stacks[f"{p1}.down_proj"].matrices == 3
    assert not any(m.startswith(p3) or "shared" in m for m in stacked_members(layers))
    from vptq_mlc.bench.random_weights import random_kind  # random weights (bench) for stacked names

    assert random_kind(f"{p2}.gate_proj.codes", layers) == ("codes", 64)
    assert random_kind(f"{p1}.gate_up_proj.codes", layers) == ("codes", 256)
    missing = _layer(p1, 3)
    del missing[f"{p1}.2.up_proj"]  # an unquantized (dense) expert projection: nothing stacks
    assert expert_stacks(missing) == {}


def test_convert_writes_the_members_concatenated(tmp_path):
    """Stacked tensors are the members' generic tensors in matrix order: code/codebook rows concatenated (matrix m's
    groups start at row m*G), per-column vectors stacked; no per-expert tensor of a stacked layer is written."""
    from vptq_mlc.artifact.tensor_cache import read_index, read_tensor
    from vptq_mlc.artifact.vq_layout import generic_layout
    from vptq_mlc.checkpoint.dequant import decode_codes
    from vptq_mlc.checkpoint.reader import VPTQCheckpoint
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    ckpt = make_synthetic_checkpoint(tmp_path / "ck", arch="deepseek_v3", num_layers=2, seed=1,
                                     layer_kwargs={"outlier_size": 8, "outlier_vector_len": 4,
                                                   "num_outlier_centroids": 16, "group_num": 2},
                                     variant="v8-k64-16")
    model = convert_checkpoint(ckpt, tmp_path / "mlc", dtype="float32")
    index = read_index(model)
    assert not [n for n in index if ".mlp.experts.0." in n]
    ck = VPTQCheckpoint.open(ckpt)
    prefix = "model.layers.1.mlp.experts"
    stacks = expert_stacks(ck.layers)
    assert sorted(stacks) == [f"{prefix}.down_proj", f"{prefix}.gate_up_proj"]
    st = stacks[f"{prefix}.gate_up_proj"]
    m = 5  # expert 2's up projection
    assert st.members[m] == f"{prefix}.2.up_proj"
    t = ck.layer_tensors(st.members[m])
    want = generic_layout(st.cfg, t, decode_codes(st.cfg, t, st.members[m]), "float32")
    for suffix, a in want.items():
        got = read_tensor(model, index[f"{st.path}.{suffix}"])
        if suffix in ("perm", "col_scale", "weight_bias"):
            assert got.shape == (st.matrices, *a.shape)
            np.testing.assert_array_equal(got[m], a)
        else:
            assert got.shape == (st.matrices * a.shape[0], *a.shape[1:])
            np.testing.assert_array_equal(got[m * a.shape[0]:(m + 1) * a.shape[0]], a)


@pytest.mark.parametrize("variant, shape, matrices, extra", [
    ("v8-k256-256", (128, 64), 16, {"outlier_size": 8, "outlier_vector_len": 4, "num_outlier_centroids": 16,
                                    "group_num": 2}),
    ("v4-k64-0", (128, 64), 16, {}),
    ("v8-k65536-0", (7168, 2048), 1200, {}),  # 1200 x 256 x 7168 codes: offsets past 2^31
])
def test_gathered_cuda_kernel_compiles_with_nvcc(variant, shape, matrices, extra):
    """The gathered kernel (symbolic rows, 4 slots): TVM's CUDA source, with 16-byte code loads, warp shuffles and
    64-bit offsets into stacks past 2^31 elements, then nvcc (sm_90) on it."""
    require_cuda_toolkit(cuobjdump=False)
    import tvm

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_gather import vq_gathered_cuda

    cfg = VPTQLayerConfig.from_variant(variant, *shape, **extra)
    funcs = {"gathered": vq_gathered_cuda(cfg, "float16", matrices, 4)}
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    kernels = kernel_definitions(generated_cuda(lambda bt: tvm.compile(mod, target=bt.target), arch="sm_90"))
    assert sorted(kernels) == ["gathered_kernel"]
    code = kernels["gathered_kernel"]
    assert "__shfl_down_sync" in code
    if variant == "v8-k256-256":  # 8 one-byte codes per lane load, one 16-byte fp16 codebook entry per lookup
        assert "*(uint2*)(codes" in code and "*(uint4*)(centroids" in code, code
    assert ("mi_ptr[0] * (int64_t)" in code) == (matrices * cfg.num_vectors * cfg.in_features >= 1 << 31), code
    (bt,) = resolve_backend("cuda", "sm_90")
    bt.prepare()
    tvm.compile(mod, target=bt.target)  # nvcc


def test_gpu_check_reference_agrees_with_the_llvm_gathered_kernel():
    """tests/gathered_kernels.py's torch reference (what the GPU check compares cuda_gather.py with) against the
    generic gathered kernel built for llvm, on the small case's operands: a GPU failure is then the CUDA kernel's."""
    import torch
    import tvm
    from gathered_kernels import CASES, _config, _operands, _reference

    from vptq_mlc.tir_kernels.generic import vq_gathered_generic

    case = CASES["small-v8-k256-256-outliers"]
    cfg, matrices, slots = _config(case), case[4], case[5]
    gen = torch.Generator().manual_seed(0)
    ops = _operands(cfg, matrices, gen, device="cpu")
    n = 3
    xs = torch.randn(n, slots, cfg.in_features, generator=gen).half()
    mat = torch.randint(0, matrices, (n, slots), generator=gen, dtype=torch.int32)
    lib = tvm.compile(tvm.IRModule({"main": vq_gathered_generic(cfg, "float16", matrices, slots)
                                    .with_attr("global_symbol", "main")}), target="llvm")
    dev = tvm.cpu()
    as_tvm = [tvm.runtime.tensor(t.numpy() if t.dtype != torch.uint16 else t.view(torch.int16).numpy().view(np.uint16),
                                 dev) for t in (xs, mat, *ops.values())]
    y = tvm.runtime.empty((n, slots, cfg.out_features), "float16", dev)
    lib["main"](*as_tvm, y)
    got = torch.from_numpy(y.numpy()).double()
    for b in range(n):
        for t in range(slots):
            ref = _reference(cfg, ops, int(mat[b, t]), xs[b, t])
            assert float((got[b, t] - ref).norm() / ref.norm()) < 2e-3, (b, t)
