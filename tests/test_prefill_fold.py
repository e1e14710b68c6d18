"""Long-prompt prefill of a normed VQ layer with the activation prologue folded into the dequantized weight
(VPTQ_MLC_PREFILL_FOLD=1, tir_kernels/cuda_dequant_gemm.py `vq_prefill_folded_cuda`): the dequantize kernel writes
`w[o, perm[k]] = W[o, k] * col_scale[k] + weight_bias[perm[k]]`, and the dense GEMM runs on the unpermuted x with the
bias in its epilogue; short prompts keep prologue + VQ MMA kernel, with the norm-bias dot and the bias added in that
kernel's epilogue.

Without a GPU: the folding kernel's per-thread code, built for the CPU in serial loops over the block and thread
indices, must reproduce the reference `dequantize` (checkpoint/dequant.py: VPTQ's final-order weight with its norm)
bit for bit; then the whole linear (this weight times unpermuted x, fp32 sums, the bias before the one rounding, as
the GEMM epilogue does) against a float64 reference of the VQ linear computed from the checkpoint tensors, ragged row
counts. The GEMM's data movement is checked by tests/test_dense_mma.py; the GPU check suite runs both branches.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from vptq_mlc.artifact.vq_layout import generic_layout
from vptq_mlc.checkpoint.dequant import decode_codes, dequantize
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.testing.synthetic import random_layer

OUTL = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
CASES = {  # variant, in, out, layer kwargs: residual, outliers, groups, v = 12, no perm, O % v != 0, bias
    "v8-k256-256-outl-bias": ("v8-k256-256", 1024, 512, {**OUTL, "bias": True}),
    "v8-k4096-0-groups": ("v8-k4096-0", 1024, 300, {"group_num": 2}),
    "v8-k4096-0-noperm": ("v8-k4096-0", 1000, 64, {"enable_perm": False}),
    "v12-k4096-0": ("v12-k4096-0", 512, 252, {"bias": True}),
    "v16-k65536-65536": ("v16-k65536-65536", 256, 64, {}),
}


def _layer(name):
    variant, i, o, kw = CASES[name]
    cfg = VPTQLayerConfig.from_variant(variant, i, o, enable_norm=True, **kw)
    rng = np.random.default_rng(11)
    tensors = random_layer(cfg, rng, "float16")
    # norm tensors of realistic spread (scale ~ per-column weight size, bias comparable to it)
    tensors["weight_scale"] = (rng.uniform(0.02, 0.2, i) * rng.choice([-1, 1], i)).astype(np.float16)
    tensors["weight_bias"] = rng.normal(0, 0.01, i).astype(np.float16)
    return cfg, tensors


def _folded_weight(cfg, tensors, threads=64):
    import tvm

    from vptq_mlc.tir_kernels.cuda_dequant_gemm import FoldPlan, vq_fold_dequantize_func

    ops = generic_layout(cfg, tensors, decode_codes(cfg, tensors), "float16")
    # few threads per CTA and 2 vector rows per CTA: column-chunk and vector-row tails
    func = vq_fold_dequantize_func(cfg, "float16", cuda=False, plan=FoldPlan(threads, 2))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    dev = tvm.cpu()
    w = tvm.runtime.tensor(np.full((cfg.out_features, cfg.in_features), np.nan, np.float16), dev)
    names = [p.name for p in func.params][:-1]
    lib["main"](*(tvm.runtime.tensor(ops[n], dev) for n in names), w)
    return w.numpy(), ops


@pytest.mark.parametrize("name", sorted(CASES))
def test_folding_dequantize_matches_reference_on_cpu(name):
    cfg, tensors = _layer(name)
    w, _ = _folded_weight(cfg, tensors)
    ref = dequantize(cfg, tensors)  # final column order, norm applied (multiply, then add, each rounded in fp16)
    assert ref.dtype == np.float16
    np.testing.assert_array_equal(w, ref)


@pytest.mark.parametrize("rows", [1, 37, 200])
def test_folded_linear_matches_float64_reference(rows):
    """y = x @ w^T (fp32 sums of the fp16 products, as mma.sync accumulates) + bias, rounded once, against the VQ
    linear in float64 from the checkpoint's tensors: codebook entries (+ residual, outliers), perm, norm scale and
    bias, bias; every row within fp16 rounding of the weight and the output."""
    cfg, tensors = _layer("v8-k256-256-outl-bias")
    w, ops = _folded_weight(cfg, tensors)
    rng = np.random.default_rng(rows)
    x = rng.normal(0, 1, (rows, cfg.in_features)).astype(np.float16)
    y = (x.astype(np.float32) @ w.astype(np.float32).T + ops["bias"].astype(np.float32)).astype(np.float16)
    # independent float64 reference: the pre-perm weight from the codes, then the VQ linear's formula
    codes = decode_codes(cfg, tensors)
    v, osz = cfg.vector_len, cfg.outlier_size
    cent = tensors["centroids.weight"].astype(np.float64).reshape(cfg.num_centroids, v)
    res = tensors["res_centroids.weight"].astype(np.float64).reshape(cfg.num_res_centroids, v)
    main = cent[codes.idx[0]] + res[codes.res[0]]  # [N, S, v]: vector row, pre-perm main column, lane
    wpre = np.zeros((cfg.out_features, cfg.in_features))
    wpre[:, osz:] = main.transpose(0, 2, 1).reshape(-1, main.shape[1])[: cfg.out_features]
    ocent = tensors["outlier_centroids.weight"].astype(np.float64).reshape(-1, cfg.outlier_vector_len)
    outl = ocent[codes.outlier_idx]  # [No, osz, vo]
    wpre[:, :osz] = outl.transpose(0, 2, 1).reshape(-1, osz)[: cfg.out_features]
    perm = codes.perm
    xd = x.astype(np.float64)
    scale = tensors["weight_scale"].astype(np.float64)
    xs = xd[:, perm] * scale[perm]  # pre-perm column k reads x[:, perm[k]], scaled by weight_scale[perm[k]]
    ref = xs @ wpre.T + xd @ tensors["weight_bias"].astype(np.float64)[:, None] + tensors["bias"].astype(np.float64)
    err = np.linalg.norm(y.astype(np.float64) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() < 2e-3, err.max()
    # the weight's columns in the pre-perm order (a fold that forgot the permutation) fails the same bound
    wrong = (x.astype(np.float32) @ w[:, perm].astype(np.float32).T + ops["bias"].astype(np.float32))
    wrong_err = np.linalg.norm(wrong - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert wrong_err.min() > 10 * 2e-3, wrong_err.min()


def test_switch_gates_the_registry(monkeypatch):
    """Off by default (no folded kernel, so the default graph is unchanged); on: normed fp16 layers the dense GEMM
    takes get the folded kernel, others (no norm, fp32, K not a multiple of 32) keep the plain path."""
    from tvm.target import Target

    from vptq_mlc.errors import CompileError
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS
    from vptq_mlc.tir_kernels.registry import PREFILL_FOLD_ENV, CudaKernelSelector

    cfg = VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512)
    monkeypatch.setenv(PREFILL_FOLD_ENV, "0")
    assert CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"})).folded(cfg, "float16", False) is None
    monkeypatch.delenv(PREFILL_FOLD_ENV, raising=False)  # on by default
    select = CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"}))
    k = select.folded(cfg, "float16", True)
    assert k.fold_from_rows == DEQUANT_GEMM_FROM_ROWS and k.scratch == (((512, 1024), "float16"),)
    params = [p.name for p in k.func.params]
    assert params[:3] == ["x", "xs", "dot"] and params[3:-2] == list(k.operands) and params[-2:] == ["w", "y"]
    assert k.operands[-4:] == ("perm", "col_scale", "weight_bias", "bias")
    assert select.folded(VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512, enable_norm=False), "float16",
                         False) is None
    assert select.folded(cfg, "float32", False) is None
    assert select.folded(VPTQLayerConfig.from_variant("v8-k4096-0", 1000, 300), "float16", False) is None
    monkeypatch.setenv(PREFILL_FOLD_ENV, "yes")
    with pytest.raises(CompileError, match=PREFILL_FOLD_ENV):
        CudaKernelSelector(Target({"kind": "cuda", "arch": "sm_90"})).folded(cfg, "float16", False)


def _prefill_calls(tmp, monkeypatch, fold: str):
    from test_cuda_aot import require_cuda_toolkit

    from vptq_mlc.bench.launches import launches, lowered_module
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint
    from vptq_mlc.tir_kernels.registry import PREFILL_FOLD_ENV, PREFILL_GROUP_ENV

    require_cuda_toolkit(cuobjdump=False)  # the CUDA backend's preparation (no nvcc run)
    monkeypatch.setenv(PREFILL_GROUP_ENV, "0")  # one folded call per linear (the groups have their own tests)
    ckpt = make_synthetic_checkpoint(tmp / "ckpt", arch="qwen2", variant="v8-k256-256", hidden_size=128,
                                     intermediate_size=256, num_layers=1, vocab_size=320)  # q/k/v with a bias
    monkeypatch.setenv(PREFILL_FOLD_ENV, fold)
    mod, _ = lowered_module(convert_checkpoint(ckpt, tmp / "mlc", dtype="float16"))
    return {f: [n for n, _ in launches(mod, f)] for f in ("prefill", "batch_prefill", "decode")}


def test_model_prefill_runs_the_folded_kernel(tmp_path, monkeypatch):
    """With the switch: the 7 linears of a prefill (symbolic rows) are folded kernels after gated prologues, with no
    `y + dot (+ bias)` pass after them; decode (static rows) is the default build's."""
    off = _prefill_calls(tmp_path / "off", monkeypatch, "0")
    on = _prefill_calls(tmp_path / "on", monkeypatch, "")  # the default
    for f in ("prefill", "batch_prefill"):
        assert sum(n.startswith("vq_matmul_folded") for n in on[f]) == 7, on[f]
        assert not any(n.startswith("vq_matmul_folded") for n in off[f])
        assert [n for n in on[f] if n.startswith("vq_prologue")] == [n for n in off[f] if n.startswith("vq_prologue")]
        # the norm-bias adds (and q/k/v's bias adds) after the 7 VQ kernels are gone
        adds_off = sum("add" in n for n in off[f])
        adds_on = sum("add" in n for n in on[f])
        assert adds_off - adds_on >= 4, (off[f], on[f])
    def family(names):  # relax numbers same-named functions in order of creation
        return [re.sub(r"\d+", "", n) for n in names]

    assert family(on["decode"]) == family(off["decode"])


def test_folded_prefill_cuda_source():
    """The folded PrimFunc holds both branches' kernels; the folding dequantize kernel keeps the plain kernel's
    16-byte weight stores (final column order: no scattered stores), stages codes and the inverse permutation in
    shared memory (the permutation read with 16-byte loads) with one barrier; the GEMMs add the bias before the
    rounding; the gated prologue keeps its barriers. Codegen only (nvcc not run)."""
    from cuda_sources import generated_cuda, kernel_definitions
    from test_cuda_aot import require_cuda_toolkit

    require_cuda_toolkit(cuobjdump=False)
    import tvm

    from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_prefill_folded_cuda
    from vptq_mlc.tir_kernels.cuda_prologue import vq_shared_prologue_cuda

    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 1024, 512, **OUTL, bias=True)
    func, operands, scratch = vq_prefill_folded_cuda(cfg, "float16", True)
    assert scratch == (((512, 1024), "float16"),)
    funcs = {"fold": func, "gated": vq_shared_prologue_cuda(1024, "float16", (True, False, True), 128)}
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    kernels = kernel_definitions(generated_cuda(lambda bt: tvm.compile(mod, target=bt.target)))
    fold = {n: k for n, k in kernels.items() if n.startswith("fold_")}
    # VQ MMA decode plan, VQ MMA prefill plan, folding dequantize, dense GEMM 64 x 64 and 128 x 128
    assert len(fold) == 5, sorted(fold)
    mma = [k for k in fold.values() if "mma.sync" in k and "ldmatrix" not in k]
    gemm = [k for k in fold.values() if "ldmatrix" in k]
    (dequant,) = [k for k in fold.values() if "mma.sync" not in k]
    assert len(mma) == 2 and len(gemm) == 2
    assert all("dot_ptr[" in k and "bias_ptr[" in k for k in mma)  # the epilogue: + dot, + bias
    assert all("(float)bias_ptr[" in k for k in gemm)
    assert len(re.findall(r"\*\(uint4\*\)\(w_ptr \+", dequant)) == cfg.vector_len  # v 16-byte stores, no scatter
    # the permutation read 4 columns per 16-byte load, one barrier after the staging
    assert re.search(r"\*\(int4\*\)\(perm_ptr \+", dequant) and "perm_ptr[" not in dequant
    assert dequant.count("__syncthreads()") == 1
    gated = [k for n, k in kernels.items() if n.startswith("gated_")]
    assert len(gated) == 1 and gated[0].count("__syncthreads()") >= 3


def test_check_suite_covers_the_folded_paths():
    from vptq_mlc.bench.kernels import correctness_cases
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS, fold_supported

    cases = [c for c in correctness_cases() if c.kernel == "fold"]
    assert all(fold_supported(c.config(), "float16") for c in cases)
    below = [c for c in cases if c.plan.get("from_rows", DEQUANT_GEMM_FROM_ROWS) > c.run_rows]
    above = [c for c in cases if c not in below]
    assert {c.run_rows <= 16 for c in below} == {True, False} and len(above) >= 5
    assert any(c.layer.get("bias") for c in below) and any(c.layer.get("bias") for c in above)
    assert any(not c.config().enable_perm for c in above) and any(c.in_features == 11008 for c in above)


class _FakeFoldLibrary:
    """The GPU check's view of a fold case's library with torch stand-ins on the CPU (no TVM compile): `func(i,
    "_prologue")` the gated prologue (xs, dot only below `from_rows`), `func(i)` the folded kernel from its
    definition (v8-k256-0 layer: one group, no residual, no outliers), optionally broken."""

    def __init__(self, case, from_rows: int, fault: str = ""):
        cfg = case.config()
        self.manifest = {"dtype": "float16", "calls": [{
            "operands": ["centroids", "codes", "perm", "col_scale", "weight_bias", "bias"],
            "scratch": [[[cfg.out_features, cfg.in_features], "float16"]]}]}
        self.from_rows, self.fault = from_rows, fault

    def func(self, i: int, suffix: str = ""):
        return self._prologue if suffix == "_prologue" else self._folded

    def _prologue(self, x, perm, col_scale, weight_bias, xs, dot):
        import torch

        x, perm, col_scale, weight_bias, xs, dot = (torch.from_dlpack(t) for t in
                                                    (x, perm, col_scale, weight_bias, xs, dot))
        if x.shape[0] < self.from_rows:
            xs.copy_(x[:, perm.long()] * col_scale)
            dot.copy_((x.double() @ weight_bias.double()).float()[:, None])

    def _folded(self, x, xs, dot, centroids, codes, perm, col_scale, weight_bias, bias, w, y):
        import torch

        x, xs, dot, centroids, codes, perm, col_scale, weight_bias, bias, w, y = (
            torch.from_dlpack(t) for t in (x, xs, dot, centroids, codes, perm, col_scale, weight_bias, bias, w, y))
        nv, length = codes.shape
        v = centroids.shape[-1]
        wpre = centroids[0][codes.long()].permute(0, 2, 1).reshape(nv * v, length)[: y.shape[1]]
        if x.shape[0] < self.from_rows or self.fault == "reads-xs":
            out = xs.double() @ wpre.double().T + (0 if self.fault == "no-dot" else dot.double())
        else:
            cols = torch.arange(length) if self.fault == "no-perm" else perm.long()
            w[:, cols] = (wpre * col_scale).to(w.dtype)
            w.copy_(w + weight_bias)
            out = x.double() @ w.double().T
        y.copy_((out + bias.double()).to(y.dtype))


@pytest.mark.parametrize("rows,from_rows", [(5, 128), (37, 128), (130, 128), (5, 0)])
def test_fold_check_passes_a_right_kernel(rows, from_rows):
    from vptq_mlc.bench.kernels import KernelCase, _check_fold_case

    case = KernelCase("v8-k256-0", 1024, 96, None, {"bias": True}, run_rows=rows, kernel="fold",
                      plan={"from_rows": from_rows})
    res = _check_fold_case(_FakeFoldLibrary(case, from_rows), 0, case, np.random.default_rng(0), device="cpu")
    assert res["ok"] and res["case"] == case.name, res


@pytest.mark.parametrize("rows,fault", [(130, "reads-xs"), (130, "no-perm"), (37, "no-dot")])
def test_fold_check_fails_a_wrong_kernel(rows, fault):
    from vptq_mlc.bench.kernels import KernelCase, _check_fold_case

    case = KernelCase("v8-k256-0", 1024, 96, None, {"bias": True}, run_rows=rows, kernel="fold")
    res = _check_fold_case(_FakeFoldLibrary(case, 128, fault), 0, case, np.random.default_rng(0), device="cpu")
    assert not res["ok"], res


class _FakeGroupLibrary:
    """`_FakeFoldLibrary` for a folded group of v8-k256-0 layers (perm per member as `perms`): `func(i, "_prologue")`
    the gated shared prologue, `func(i)` the group kernel writing member m into columns m*O.., optionally broken
    ("swap": members 0 and 1 in each other's columns, "skip-last": the last member's columns never written)."""

    def __init__(self, case, perms: tuple[bool, ...], from_rows: int, fault: str = ""):
        cfg = case.config()
        names = [["centroids", "codes", *(["perm"] if p else []), "col_scale", "weight_bias"] for p in perms]
        self.manifest = {"dtype": "float16", "calls": [{
            "operands": names[0], "group_operands": names,
            "scratch": [[[len(perms) * cfg.out_features, cfg.in_features], "float16"]]}]}
        self.perms, self.from_rows, self.fault = perms, from_rows, fault

    def func(self, i: int, suffix: str = ""):
        return self._prologue if suffix == "_prologue" else self._group

    def _members(self, args: list, per: int) -> list[list]:
        out, j = [], 0
        for p in self.perms:
            n = per + (1 if p else 0)
            out.append(args[j:j + n])
            j += n
        return out

    def _prologue(self, *args):
        import torch

        t = [torch.from_dlpack(a) for a in args]
        x, rest = t[0], t[1:]
        ins, outs = rest[: len(rest) - 2 * len(self.perms)], rest[len(rest) - 2 * len(self.perms):]
        for m, vec in enumerate(self._members(ins, 2)):
            perm = vec[0] if self.perms[m] else None
            col_scale, weight_bias = vec[-2], vec[-1]
            if x.shape[0] < self.from_rows:
                outs[2 * m].copy_((x[:, perm.long()] if perm is not None else x) * col_scale)
                outs[2 * m + 1].copy_((x.double() @ weight_bias.double()).float()[:, None])

    def _group(self, *args):
        import torch

        t = [torch.from_dlpack(a) for a in args]
        x, w, y = t[0], t[-2], t[-1]
        count = len(self.perms)
        width = y.shape[1] // count
        for m, (xs, dot, centroids, codes, *vec) in enumerate(self._members(t[1:-2], 6)):
            perm = vec[0] if self.perms[m] else None
            col_scale, weight_bias = vec[-2], vec[-1]
            nv, length = codes.shape
            v = centroids.shape[-1]
            wpre = centroids[0][codes.long()].permute(0, 2, 1).reshape(nv * v, length)[:width]
            if x.shape[0] < self.from_rows:
                out = xs.double() @ wpre.double().T + dot.double()
            else:
                wm = w[m * width:(m + 1) * width]
                wm[:, perm.long() if perm is not None else torch.arange(length)] = (wpre * col_scale).to(w.dtype)
                wm.copy_(wm + weight_bias)
                out = x.double() @ wm.double().T
            col = {0: 1, 1: 0}.get(m, m) if self.fault == "swap" else m
            if not (self.fault == "skip-last" and m == count - 1):
                y[:, col * width:(col + 1) * width] = out.to(y.dtype)


@pytest.mark.parametrize("rows,from_rows,prologue", [(5, 128, "pnp"), (37, 128, "pp"), (130, 128, "np"),
                                                     (5, 0, "pnp")])
def test_fold_group_check_passes_a_right_kernel(rows, from_rows, prologue):
    from vptq_mlc.bench.kernels import KernelCase, _check_fold_group_case

    case = KernelCase("v8-k256-0", 1024, 96, None, run_rows=rows, kernel="fold-group", prologue=prologue,
                      plan={"from_rows": from_rows})
    lib = _FakeGroupLibrary(case, tuple(ch == "p" for ch in prologue), from_rows)
    res = _check_fold_group_case(lib, 0, case, np.random.default_rng(0), device="cpu")
    assert len(res) == len(prologue) and all(r["ok"] for r in res), res


@pytest.mark.parametrize("rows,fault", [(130, "swap"), (37, "swap"), (130, "skip-last")])
def test_fold_group_check_fails_a_wrong_kernel(rows, fault):
    from vptq_mlc.bench.kernels import KernelCase, _check_fold_group_case

    case = KernelCase("v8-k256-0", 1024, 96, None, run_rows=rows, kernel="fold-group", prologue="ppp")
    res = _check_fold_group_case(_FakeGroupLibrary(case, (True,) * 3, 128, fault), 0, case,
                                 np.random.default_rng(0), device="cpu")
    assert not all(r["ok"] for r in res), res


def test_check_suite_covers_the_folded_group_paths():
    from vptq_mlc.bench.kernels import correctness_cases
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS

    cases = [c for c in correctness_cases() if c.kernel == "fold-group"]
    rows = {(c.run_rows <= 16, c.run_rows < c.plan.get("from_rows", DEQUANT_GEMM_FROM_ROWS)) for c in cases}
    assert {(True, True), (False, True), (False, False)} <= rows  # decode plan, prefill plan, dequantize + GEMM
    assert any(len(c.prologue) == 2 for c in cases) and any(len(c.prologue) == 3 for c in cases)
    assert any(set(c.prologue) == {"p", "n"} for c in cases)
    assert {(c.in_features, c.out_features) for c in cases} >= {(4096, 4096), (4096, 11008)}


def test_folded_group_cuda_source():
    """The group PrimFunc holds each member's two VQ MMA kernels (writing its columns of y) and folding
    dequantize, and ONE GEMM ladder over all outputs; codegen only (nvcc not run)."""
    from cuda_sources import generated_cuda, kernel_definitions
    from test_cuda_aot import require_cuda_toolkit

    require_cuda_toolkit(cuobjdump=False)
    import tvm

    from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_prefill_folded_group_cuda

    cfg = VPTQLayerConfig.from_variant("v8-k256-256", 1024, 512, **OUTL)
    func, operands, scratch = vq_prefill_folded_group_cuda(cfg, "float16", (True, False, True))
    assert scratch == (((1536, 1024), "float16"),)
    assert [len(o) for o in operands] == [len(operands[1]) + 1, len(operands[1]), len(operands[1]) + 1]
    assert [p.name for p in func.params][:3] == ["x", "xs_0", "dot_0"] and func.params[-1].name == "y"
    kernels = kernel_definitions(generated_cuda(lambda bt: tvm.compile(
        tvm.IRModule({"grp": func.with_attr("global_symbol", "grp")}), target=bt.target)))
    mma = [k for k in kernels.values() if "mma.sync" in k and "ldmatrix" not in k]
    gemm = [k for k in kernels.values() if "ldmatrix" in k]
    dequant = [k for k in kernels.values() if "mma.sync" not in k]
    assert len(mma) == 6 and len(dequant) == 3 and len(gemm) == 2, sorted(kernels)
    # y rows are 3 * 512 wide; the second member's MMA kernels write from column 512 on
    assert all("* (int64_t)24576)" in k or "* (int64_t)98304)" in k for k in mma)
    assert sum("+ (int64_t)512)" in k or "+ (int64_t)1024)" in k for k in mma) >= 4


def test_group_switch_gates_the_registry(monkeypatch):
    """On by default (off with the switch at 0): 2..3 normed layers without bias get one group kernel whose
    parameters follow its operand lists; a bias, one layer or four, or the folded prefill off: none."""
    from tvm.target import Target

    from vptq_mlc.errors import CompileError
    from vptq_mlc.tir_kernels.registry import PREFILL_FOLD_ENV, PREFILL_GROUP_ENV, CudaKernelSelector

    cfg = VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512)
    target = Target({"kind": "cuda", "arch": "sm_90"})
    monkeypatch.setenv(PREFILL_GROUP_ENV, "0")
    assert CudaKernelSelector(target).folded_group(cfg, "float16", (True, True)) is None
    monkeypatch.delenv(PREFILL_GROUP_ENV, raising=False)
    select = CudaKernelSelector(target)
    k = select.folded_group(cfg, "float16", (True, False))
    assert k.scratch == (((1024, 1024), "float16"),) and k.operands[0][-3:] == ("perm", "col_scale", "weight_bias")
    assert [p.name for p in k.func.params] == ["x", *(f"{n}_{m}" for m, names in enumerate(k.operands)
                                                      for n in ("xs", "dot", *names)), "w", "y"]
    assert select.folded_group(VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512, bias=True), "float16",
                               (True, True)) is None
    assert select.folded_group(cfg, "float16", (True,)) is None and select.folded_group(cfg, "float16",
                                                                                        (True,) * 4) is None
    # the residual epilogue comes with the same switch; its operand follows the layer's
    k = select.folded(cfg, "float16", True, residual=True)
    assert k.operands[-2:] == ("bias", "residual") and [p.name for p in k.func.params][-3:] == ["residual", "w", "y"]
    monkeypatch.setenv(PREFILL_GROUP_ENV, "0")
    assert CudaKernelSelector(target).folded(cfg, "float16", False, residual=True) is None
    monkeypatch.setenv(PREFILL_GROUP_ENV, "1")
    monkeypatch.setenv(PREFILL_FOLD_ENV, "0")
    assert CudaKernelSelector(target).folded_group(cfg, "float16", (True, True)) is None
    monkeypatch.setenv(PREFILL_GROUP_ENV, "2")
    with pytest.raises(CompileError, match=PREFILL_GROUP_ENV):
        CudaKernelSelector(target).folded_group(cfg, "float16", (True, True))


def test_model_prefill_runs_folded_groups(tmp_path, monkeypatch):
    """With the group switch: a Llama layer's prefill runs q/k/v as one group call (its y is the attention's qkv:
    no concatenation) and gate/up as another, o and down as single folded calls adding the residual themselves;
    decode is the default build's.
    (With GQA, k and v form the group and q joins them by a concatenation.)"""
    from test_cuda_aot import require_cuda_toolkit

    from vptq_mlc.bench.launches import launches, lowered_module
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint
    from vptq_mlc.tir_kernels.registry import PREFILL_GROUP_ENV

    require_cuda_toolkit(cuobjdump=False)
    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-256", hidden_size=128,
                                     intermediate_size=256, num_layers=1, num_kv_heads=4, vocab_size=320)  # MHA
    calls = {}
    for on in ("0", "1"):
        monkeypatch.setenv(PREFILL_GROUP_ENV, on)
        mod, _ = lowered_module(convert_checkpoint(ckpt, tmp_path / f"mlc{on}", dtype="float16"))
        calls[on] = {f: [n for n, _ in launches(mod, f)] for f in ("prefill", "batch_prefill", "decode")}
    for f in ("prefill", "batch_prefill"):
        on, off = calls["1"][f], calls["0"][f]
        assert sum(n.startswith("vq_matmul_folded_group") for n in on) == 2, on
        assert sum(re.match(r"vq_matmul_folded\d*$", n) is not None for n in on) == 2, on
        assert sum(re.match(r"vq_matmul_folded\d*$", n) is not None for n in off) == 7, off
        assert any("concatenate" in n for n in off) and not any("concatenate" in n for n in on), on
        # gate/up's halves are read by the silu * up kernel itself (no copy of them)
        assert any(n.startswith("fused_columns") and "silu" in n for n in on), on
        # o_proj and down_proj add the residual in their epilogues: no add kernels left
        assert sum("add" in n for n in off) >= 2 and not any("add" in n for n in on), on
        assert len(on) < len(off)

    def family(names):
        return [re.sub(r"\d+", "", n) for n in names]

    assert family(calls["1"]["decode"]) == family(calls["0"]["decode"])


class _FakeResidualLibrary(_FakeFoldLibrary):
    """`_FakeFoldLibrary` whose folded kernel takes the residual as its last operand and adds it (or not)."""

    def __init__(self, case, from_rows: int, fault: str = ""):
        super().__init__(case, from_rows, "" if fault == "no-residual" else fault)
        self.manifest["calls"][0]["operands"].append("residual")
        self.skip = fault == "no-residual"

    def func(self, i: int, suffix: str = ""):
        return self._prologue if suffix == "_prologue" else self._folded_residual

    def _folded_residual(self, *args):
        import torch

        *head, residual, w, y = args
        self._folded(*head, w, y)
        if not self.skip:
            yt = torch.from_dlpack(y)
            yt.copy_(yt + torch.from_dlpack(residual))


@pytest.mark.parametrize("rows,fault,ok", [(130, "", True), (37, "", True), (130, "no-residual", False),
                                           (37, "no-residual", False)])
def test_fold_residual_check(rows, fault, ok):
    from vptq_mlc.bench.kernels import KernelCase, _check_fold_case

    case = KernelCase("v8-k256-0", 1024, 96, None, {"bias": True}, run_rows=rows, kernel="fold", fused="residual")
    res = _check_fold_case(_FakeResidualLibrary(case, 128, fault), 0, case, np.random.default_rng(0), device="cpu")
    assert res["ok"] is ok, res


@pytest.mark.parametrize("variant", ["v8-k4096-0", "v8-k256-256"])
def test_fold_sweep_reference_matches_the_folding_kernel(variant):
    """bench/prefill_gemm.py's torch reference for the folding dequantize (gather, scale, scatter through the
    permutation) gives the kernel's bits (serial CPU build); the same weight unpermuted does not."""
    import importlib.util
    from pathlib import Path

    import torch
    import tvm

    from vptq_mlc.artifact.vq_layout import vq_operand_shapes
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import FoldPlan, vq_fold_dequantize_func

    spec = importlib.util.spec_from_file_location("prefill_gemm", Path(__file__).parents[1] / "bench/prefill_gemm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    cfg = VPTQLayerConfig.from_variant(variant, 512, 64, enable_norm=True, enable_perm=True)
    gen = torch.Generator().manual_seed(0)
    hi = {"codes": cfg.num_centroids, "res_codes": cfg.num_res_centroids}
    ops = {n: (torch.randn(shape, generator=gen) * 0.02).half() if dt == "float"
           else torch.randint(0, hi[n], shape, generator=gen).to(getattr(torch, dt))
           for n, (shape, dt) in vq_operand_shapes(cfg).items()}
    ops.update(bench._fold_norm_operands(512, gen))
    func = vq_fold_dequantize_func(cfg, "float16", cuda=False, plan=FoldPlan(64, 2))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    w = tvm.runtime.tensor(np.full((64, 512), np.nan, np.float16))
    lib["main"](*(tvm.runtime.tensor(ops[p.name].numpy()) for p in func.params[:-1]), w)
    ref = bench._fold_reference(cfg, ops).numpy()
    np.testing.assert_array_equal(w.numpy(), ref)
    assert not np.array_equal(w.numpy(), ref[:, np.argsort(ops["perm"].numpy())])
