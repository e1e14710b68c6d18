"""The two-launch decode linear (`cuda_gemv.vq_gemv_cuda(..., two_launch=True)`): a prologue kernel that makes the
layer input from its neighbour (RMSNorm(x) * gamma, silu(gate) * up, or x) and writes each layer's permuted, scaled
activation and norm-bias dot, then the VQ GEMV adding the dot (and the residual) in its epilogue, q/k/v side by side.

Checked without a GPU: the CUDA source TVM generates for both kernels runs on the CPU (tests/decode_attn_emulator.py:
one OS thread per CUDA thread, warp shuffles through a per-warp exchange, `half` as IEEE binary16), against float64
from an independent dequantization of the checkpoint tensors (tests/reference_dequant.py) and a float64 neighbour.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from reference_dequant import ref_dequant

from vptq_mlc.artifact.vq_layout import generic_layout
from vptq_mlc.checkpoint.dequant import decode_codes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.testing.synthetic import random_layer
from vptq_mlc.tir_kernels.fused_input import FusedInput

EPS = 1e-5
ROW_REL_ERR_MAX = 2e-3  # the GPU check suite's bound (bench/kernels.py)

# name: variant, in, out, rows, has_perm per layer, neighbour source, residual, concat
CASES = {
    "qkv-rmsnorm-concat": ("v8-k256-256", 1024, 256, 2, (True, False, True), "rmsnorm", False, True),
    "gate-up-rmsnorm": ("v8-k4096-0", 1024, 256, 1, (True, True), "rmsnorm", False, False),
    "down-swiglu-residual": ("v8-k4096-0", 2048, 256, 3, (True,), "swiglu", True, False),
    "o-residual": ("v8-k256-256", 1024, 512, 1, (True,), "x", True, False),
}


def _layer(variant: str, i: int, o: int, has_perm: bool, seed: int):
    cfg = VPTQLayerConfig.from_variant(variant, i, o, enable_norm=True, enable_perm=has_perm)
    rng = np.random.default_rng(seed)
    t = random_layer(cfg, rng, "float16")
    t["weight_scale"] = (rng.uniform(0.02, 0.2, i) * rng.choice([-1, 1], i)).astype(np.float16)
    t["weight_bias"] = rng.normal(0, 0.01, i).astype(np.float16)
    return cfg, t


def _source(cfg, rows: int, perms, opts: FusedInput, dtype: str = "float16") -> str:
    from cuda_sources import generated_cuda

    from vptq_mlc.tir_kernels.cuda_gemv import vq_gemv_cuda

    def build(bt):
        f = vq_gemv_cuda(cfg, dtype, rows, prologue=perms, fused=opts, two_launch=True)
        with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            tvm.compile(tvm.IRModule({"two": f.with_attr("global_symbol", "two")}), target=bt.target)

    return generated_cuda(build, "sm_90")


def _run(name: str, tmp_path, fault: str = "", dtype: str = "float16"):
    """(y per layer from the emulated kernels, float64 reference per layer); `dtype`: the model's (fp32 models run
    the same kernels at decode)."""
    from decode_attn_emulator import EmulatedKernels

    from vptq_mlc.tir_kernels.cuda_gemv import plan_gemv
    from vptq_mlc.tir_kernels.cuda_prologue import THREADS

    variant, i, o, rows, perms, source, residual, concat = CASES[name]
    layers = [_layer(variant, i, o, p, 100 + m) for m, p in enumerate(perms)]
    cfg = layers[0][0]
    opts = FusedInput(source, EPS if source == "rmsnorm" else 0.0, residual, concat)
    emu = EmulatedKernels(_source(cfg, rows, perms, opts, dtype), tmp_path)
    rng = np.random.default_rng(7)
    dt = np.dtype(dtype)
    x = rng.standard_normal((rows, i)).astype(dt)
    args: dict[str, np.ndarray] = {"x": x}
    xf = x.astype(np.float64)
    if source == "rmsnorm":
        gamma = (1 + 0.1 * rng.standard_normal(i)).astype(dt)
        args["gamma"] = gamma
        xin = (xf / np.sqrt((xf**2).mean(-1, keepdims=True) + EPS) * gamma.astype(np.float64)).astype(dt)
    elif source == "swiglu":
        up = rng.standard_normal((rows, i)).astype(dt)
        args["x2"] = up
        xin = ((xf / (1 + np.exp(-xf))).astype(dt) * up).astype(dt)
    else:
        xin = x
    if fault == "no-norm":
        xin = x
    refs = []
    for m, (lcfg, t) in enumerate(layers):
        ops = generic_layout(lcfg, t, decode_codes(lcfg, t), dtype)
        for key, arr in ops.items():
            args[f"{key}_{m}"] = np.ascontiguousarray(arr)
        args[f"xs_{m}"] = np.full((rows, i), np.nan, dt)
        args[f"dot_{m}"] = np.full((rows, 1), np.nan, np.float32)
        w = ref_dequant(lcfg.to_json(), {k: (v.astype(np.float64) if v.dtype == np.float16 else v)
                                         for k, v in t.items()})
        refs.append(xin.astype(np.float64) @ w.T)
    if residual:
        args["residual"] = rng.standard_normal((rows, o)).astype(dt)
        refs = [r + args["residual"].astype(np.float64) for r in refs]
    width = o * len(perms) if concat else o
    outs = ["y_0"] if concat else [f"y_{m}" for m in range(len(perms))]
    for name_y in outs:
        args[name_y] = np.full((rows, width), np.nan, dt)
    pro, gemv = emu.kernels
    emu.launch(pro, (rows, -(-i // THREADS), len(perms)), (THREADS, 1), args)
    if fault == "no-dot":
        for m in range(len(perms)):
            args[f"dot_{m}"][:] = 0
    p = plan_gemv(cfg, rows, dtype)
    emu.launch(gemv, (p.grid * len(perms), 1, 1), (32, p.warps), args)
    ys = np.split(args["y_0"], len(perms), axis=1) if concat else [args[n] for n in outs]
    return ys, refs


def _row_rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float((np.linalg.norm(y.astype(np.float64) - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_launch_linear_matches_float64(name, tmp_path):
    ys, refs = _run(name, tmp_path)
    for y, ref in zip(ys, refs, strict=True):
        assert not np.isnan(y).any()
        assert _row_rel_err(y, ref) < ROW_REL_ERR_MAX


@pytest.mark.parametrize("name, fault", [("gate-up-rmsnorm", "no-norm"), ("qkv-rmsnorm-concat", "no-dot")])
def test_a_wrong_neighbour_or_dot_fails_the_bound(name, fault, tmp_path):
    """The bound catches a kernel that skipped the RMSNorm (reference without it) or a GEMV that lost the dot."""
    ys, refs = _run(name, tmp_path, fault)
    assert max(_row_rel_err(y, ref) for y, ref in zip(ys, refs, strict=True)) > 5 * ROW_REL_ERR_MAX


@pytest.mark.parametrize("name", ["qkv-rmsnorm-concat", "down-swiglu-residual"])
def test_two_launch_linear_of_an_fp32_model(name, tmp_path):
    ys, refs = _run(name, tmp_path, dtype="float32")
    for y, ref in zip(ys, refs, strict=True):
        assert not np.isnan(y).any()
        assert _row_rel_err(y, ref) < ROW_REL_ERR_MAX
