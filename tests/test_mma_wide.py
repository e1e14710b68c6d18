"""The whole-entry tensor-core decode kernel (vptq_mlc/tir_kernels/cuda_mma_wide.py): the compile switch
`VPTQ_MLC_MMA_WIDE` (on by default: the registry's tensor-core decode layers with v = 8 take it; 0 keeps
`cuda_mma.py`), its launch plans (shared memory that launches, the wave rule for steps per load), and its results
on the CPU: the CUDA source TVM generates, run with C++ models of `ldmatrix` and `mma.sync.m16n8k16` written from the
PTX ISA's fragment tables (tests/mma_emulator.py), against float64 `xs @ W.T` with W from the independent reference
dequantizer (tests/reference_dequant.py). A deliberately wrong fragment layout in the models fails the same check.
nvcc builds the kernels into one library next to `cuda_mma.py`'s. No GPU here: `vptq-mlc bench build --suite
check` carries the kernel's GPU cases. ~1 min on 2 cores.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from cuda_sources import generated_cuda, kernel_definitions
from reference_dequant import ref_dequant

from vptq_mlc.errors import CompileError

OUTL = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
# name: (variant, in, out, rows, layer kwargs, plan overrides); norm off (the prologue's part), perm on
CASES = {
    "res_outliers_replicated_r11": ("v8-k256-256", 1024, 512, 11, OUTL, {}),
    "k4096_r16": ("v8-k4096-0", 1024, 512, 16, {}, {}),
    "k256_r16_two_pairs": ("v8-k256-0", 1024, 512, 16, {}, {"pair_tiles": 2, "unroll": 1}),
    "k65536_global_book_r8": ("v8-k65536-0", 512, 256, 8, {}, {}),
    "groups_partial_vector_r5": ("v8-k256-0", 1024, 300, 5, {"group_num": 2}, {}),
    "two_steps_per_load_r13": ("v8-k256-0", 1056, 264, 13, {}, {}),  # 1056 columns: 32-column chunks
    # 36 outlier columns: a partial outlier step, activations of the codes region at 8-byte alignment (4-wide loads)
    "odd_outliers_r16": ("v8-k4096-0", 1060, 256, 16, {**OUTL, "outlier_size": 36}, {}),
    # A fragments built in registers (`register_tiles`): 8 vector rows per warp, 4 tiles of element pairs
    "reg_k4096_r16": ("v8-k4096-0", 1024, 512, 16, {}, {"register_tiles": True}),
    "reg_res_outliers_replicated_r11": ("v8-k256-256", 1024, 512, 11, OUTL, {"register_tiles": True}),
    "reg_k65536_global_book_r1": ("v8-k65536-256", 512, 256, 1, {}, {"register_tiles": True}),
    "reg_groups_partial_vector_r5": ("v8-k256-0", 1024, 300, 5, {"group_num": 2}, {"register_tiles": True}),
    "reg_two_steps_two_rows_r8": ("v8-k4096-0", 1056, 264, 8, {}, {"register_tiles": True, "row_groups": 2}),
    "reg_uint8_codes_one_split_r16": ("v8-k256-0", 512, 128, 16, {}, {"register_tiles": True, "splits": 1,
                                                                       "unroll": 4}),
}


def _cfg(variant, i, o, layer):
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

    return VPTQLayerConfig.from_variant(variant, i, o, enable_norm=False, **layer)


@pytest.fixture(scope="module")
def kernels():
    """name -> (config, rows, plan, generated kernel source), all built in one TVM compile."""
    import tvm

    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, vq_mma_wide_cuda

    out, funcs = {}, {}
    for name, (variant, i, o, rows, layer, plan) in CASES.items():
        cfg = _cfg(variant, i, o, layer)
        p = replace(plan_mma_wide(cfg, rows, plan.get("register_tiles", False)), **plan)
        funcs[name] = vq_mma_wide_cuda(cfg, "float16", rows, p).with_attr("global_symbol", name)
        out[name] = (cfg, rows, p)
    src = kernel_definitions(generated_cuda(lambda bt: tvm.compile(tvm.IRModule(funcs), target=bt.target), "sm_90"))
    return {name: (*out[name], src[f"{name}_kernel"]) for name in CASES}


def _layer(cfg, rows, rng, suffix=""):
    """(kernel arguments named with `suffix`: xs, the generic operands and a NaN-poisoned y, float64 reference
    `xs @ W.T`) for a random layer of `cfg` and random activations."""
    from vptq_mlc.artifact.vq_layout import generic_layout
    from vptq_mlc.checkpoint.dequant import decode_codes
    from vptq_mlc.testing.synthetic import random_layer

    tensors = random_layer(cfg, rng, "float16", scale=0.5 / np.sqrt(cfg.in_features))
    ops = generic_layout(cfg, tensors, decode_codes(cfg, tensors), "float16")
    w = ref_dequant(cfg.to_json(), tensors).astype(np.float64)
    perm = np.asarray(tensors["perm"]).view(np.uint16).astype(np.int64) if cfg.enable_perm else None
    if perm is not None:  # the kernel reads xs = x[:, perm]: W's columns in that order
        w = w[:, perm]
    xs = rng.standard_normal((rows, cfg.in_features)).astype(np.float16)
    y = np.full((rows, cfg.out_features), np.nan, np.float16)  # poisoned: an output never written shows
    args = {f"xs{suffix}": xs, f"y{suffix}": y, **{f"{k}{suffix}": np.ascontiguousarray(a) for k, a in ops.items()}}
    return args, xs.astype(np.float64) @ w.T


def _run(kernel, tmp_path, layout="ptx", seed=0):
    """(y from the emulated kernel, float64 reference) for one case: random layer and activations."""
    from mma_emulator import MmaKernelEmulator

    from vptq_mlc.tir_kernels.cuda_mma_wide import warp_vector_rows

    cfg, rows, plan, source = kernel
    args, ref = _layer(cfg, rows, np.random.default_rng(seed))
    emu = MmaKernelEmulator(source, tmp_path, layout)
    # register fragments never go through ldmatrix
    assert (emu.counts["ldmatrix"] == 0) == plan.register_tiles and emu.counts["mma"] > 0, emu.counts
    grid = -(-cfg.num_vectors // (plan.row_groups * warp_vector_rows(plan)))
    emu(args, grid, plan.row_groups * plan.splits)
    return args["y"].astype(np.float64), ref


def _row_err(y, ref):
    return float((np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_dequant_on_cpu(kernels, tmp_path, name):
    """Every output row within fp16 rounding of float64 `xs @ W.T` (residual + outliers + replicated book, uint16
    codes, two pairs of vector rows per warp, the book read from global memory, two groups with a partial last
    vector row, 32-column chunks, 36 outlier columns; 5..16 rows: one and two n-tiles, rows past the batch), in
    the tile form and with register fragments (1 row too)."""
    y, ref = _run(kernels[name], tmp_path)
    assert not np.isnan(y).any()
    err = _row_err(y, ref)
    print(f"{name}: max row rel err {err:.2e}")
    assert err < 2e-3, err


@pytest.mark.parametrize("layout", ["wrong-trans", "wrong-b"])
def test_wrong_fragment_layout_fails_the_check(kernels, tmp_path, layout):
    """The check can fail: with ldmatrix's .trans semantics swapped, or B's two k halves swapped, in the PTX
    models, the same kernel is far off the reference."""
    y, ref = _run(kernels["k4096_r16"], tmp_path, layout)
    err = _row_err(y, ref)
    print(f"{layout}: max row rel err {err:.2e}")
    assert err > 0.1, err


def test_registry_gives_register_fragments_to_wide_layers_only(monkeypatch):
    """With VPTQ_MLC_REGISTER_TILES=1 the registry's tensor-core decode kernel of a v = 8 layer builds its A
    fragments in registers from 8192 outputs with the book in shared memory (measured faster there, slower at 4096
    outputs and with a K = 65536 book); without the switch, never."""
    from vptq_mlc.tir_kernels.cuda_mma_wide import REGISTER_TILES_ENV, register_tiles_preferred

    wide, short = _cfg("v8-k4096-0", 4096, 11008, {}), _cfg("v8-k4096-0", 4096, 4096, {})
    monkeypatch.setenv(REGISTER_TILES_ENV, "1")
    assert register_tiles_preferred(wide, "float16", 16) and register_tiles_preferred(wide, "float16", 8)
    assert register_tiles_preferred(_cfg("v8-k256-256", 4096, 11008, {}), "float16", 16)
    assert not register_tiles_preferred(short, "float16", 16)
    assert not register_tiles_preferred(_cfg("v8-k65536-256", 4096, 11008, {}), "float16", 16)
    assert not register_tiles_preferred(_cfg("v12-k4096-0", 4096, 11004, {}), "float16", 16)  # v = 12: no wide form
    assert register_tiles_preferred(short, "float16", 16, count=2)  # q/k/v or gate/up of 4096 in one launch
    monkeypatch.setenv(REGISTER_TILES_ENV, "0")
    assert not register_tiles_preferred(wide, "float16", 16)


@pytest.mark.parametrize("variant,i,o,rows,layer,count", [
    ("v8-k4096-0", 1024, 512, 16, {}, 3),  # q/k/v
    ("v8-k256-256", 1024, 264, 11, OUTL, 2),  # gate/up with residual + outliers, a partial last CTA
])
def test_layers_in_one_launch_match_each_reference(tmp_path, variant, i, o, rows, layer, count):
    """`count` layers of one config in one launch (`KernelSelector.shared` at the tensor-core decode rows): CTA bx
    serves layer bx // NRB; every layer's output rows within fp16 rounding of its own float64 `xs @ W.T`, from its
    own codes, books and activations (a layer's output from another's operands would be far off)."""
    import tvm
    from mma_emulator import MmaKernelEmulator

    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, vq_mma_wide_cuda, warp_vector_rows

    cfg = _cfg(variant, i, o, layer)
    plan = plan_mma_wide(cfg, rows, register_tiles=True, count=count)
    assert plan.splits > 1  # the separate split-sum scratch of several layers is exercised
    f = vq_mma_wide_cuda(cfg, "float16", rows, plan, count).with_attr("global_symbol", "multi")
    src = kernel_definitions(generated_cuda(lambda bt: tvm.compile(tvm.IRModule({"multi": f}), target=bt.target),
                                            "sm_90"))["multi_kernel"]
    rng = np.random.default_rng(7)
    args, refs = {}, []
    for m in range(count):
        layer_args, ref = _layer(cfg, rows, rng, f"_{m}" if m else "")
        args.update(layer_args)
        refs.append(ref)
    emu = MmaKernelEmulator(src, tmp_path)
    nrb = -(-cfg.num_vectors // (plan.row_groups * warp_vector_rows(plan)))
    emu(args, nrb * count, plan.row_groups * plan.splits)
    for m in range(count):
        y = args[f"y_{m}" if m else "y"].astype(np.float64)
        assert not np.isnan(y).any(), m
        err = _row_err(y, refs[m])
        print(f"layer {m} of {count}: max row rel err {err:.2e}")
        assert err < 2e-3, (m, err)


@pytest.mark.parametrize("variant,i,o,rows,layer,perms,fused,register_tiles,cta_splits", [
    ("v8-k4096-0", 1024, 512, 16, {}, (True, True, True), "rmsnorm,concat", True, 1),  # q/k/v side by side
    ("v8-k4096-0", 1024, 512, 16, {}, (True, False, True), "rmsnorm,concat", False, 1),  # the same, tile form
    ("v8-k256-256", 1024, 264, 11, OUTL, (True, True), "rmsnorm", True, 1),  # gate/up: residual book, outliers
    ("v8-k256-256", 1024, 264, 11, OUTL, (True,), "residual", False, 1),  # o_proj: + the residual stream
    ("v8-k65536-256", 512, 256, 8, {}, (False,), "swiglu,residual", False, 1),  # down_proj, the book through L1/L2
    # CTA splits: o_proj over 2 CTAs per row block; down_proj with a residual book and outliers over 3 (chunks and
    # outlier steps not a multiple of the splits: some splits get fewer)
    ("v8-k4096-0", 1024, 512, 16, {}, (True,), "residual", True, 2),
    ("v8-k256-256", 1056, 264, 12, OUTL, (True,), "swiglu,residual", True, 3),
])
def test_two_launch_form_adds_dot_and_residual_and_concatenates(tmp_path, variant, i, o, rows, layer, perms, fused,
                                                                register_tiles, cta_splits):
    """The two-launch form (`vq_mma_wide_cuda(..., prologue=...)`, the registry's choice at the tensor-core rows):
    its second kernel, run on each layer's prepared activation xs_m and norm-bias dot_m (what the prologue kernel
    writes; that kernel is `cuda_prologue.prepare_launch`, the GEMV's), gives every layer's float64
    `xs_m @ W_m.T + dot_m (+ residual)` within fp16 rounding, layer m at columns m * O of one output with concat.
    Layers of one launch in the tile form too (a form the kernel supports; the registry groups layers only with
    register fragments). With CTA splits, the last CTA of each row block adds the partial sums (the emulator runs
    CTAs one after another, each row block's counter starting at 0 as the prologue launch leaves it), every counter
    ends at the number of CTAs that arrived, the output has the same bits when the CTAs arrive in the reverse order,
    and the prologue launch zeroes the counters."""
    import tvm
    from mma_emulator import MmaKernelEmulator

    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, vq_mma_wide_cuda, warp_vector_rows
    from vptq_mlc.tir_kernels.fused_input import FusedInput

    parts = set(fused.split(","))
    opts = FusedInput("rmsnorm" if "rmsnorm" in parts else "swiglu" if "swiglu" in parts else "x", 1e-5,
                      "residual" in parts, "concat" in parts)
    cfg = _cfg(variant, i, o, layer)  # the VQ product alone: the norm is xs's column scale and the dot
    count = len(perms)
    plan = replace(plan_mma_wide(cfg, rows, register_tiles, count), cta_splits=cta_splits)
    f = vq_mma_wide_cuda(replace(cfg, enable_norm=True), "float16", rows, plan, prologue=perms, fused=opts)
    f = f.with_attr("global_symbol", "two")
    src = kernel_definitions(generated_cuda(lambda bt: tvm.compile(tvm.IRModule({"two": f}), target=bt.target),
                                            "sm_90"))
    assert set(src) == {"two_kernel", "two_kernel_1"}  # the prologue launch, then the tensor-core launch
    rng = np.random.default_rng(11)
    args, refs = {}, []
    for m in range(count):
        layer_args, ref = _layer(cfg, rows, rng, f"_{m}" if m else "")
        dot = rng.standard_normal((rows, 1)).astype(np.float32)
        args.update(layer_args, **{f"dot_{m}": dot})
        refs.append(ref + dot.astype(np.float64))
    if opts.residual:
        args["residual"] = rng.standard_normal((rows, o)).astype(np.float16)
        refs[0] = refs[0] + args["residual"].astype(np.float64)
    if opts.concat:
        args["y"] = np.full((rows, count * o), np.nan, np.float16)
    nrb = -(-cfg.num_vectors // (plan.row_groups * warp_vector_rows(plan)))
    if cta_splits > 1:
        args["part"] = np.full((cta_splits, rows, o), np.nan, np.float32)
        args["counters"] = np.zeros(nrb, np.int32)
        assert "counters_ptr[" in src["two_kernel"] and "= 0;" in src["two_kernel"]  # the prologue zeroes them
    emu = MmaKernelEmulator(src["two_kernel_1"], tmp_path)
    emu(args, nrb * count * cta_splits, plan.row_groups * plan.splits)
    if cta_splits > 1:
        assert (args["counters"] == cta_splits).all(), args["counters"]
        # the other arrival order (CTA 0 of each row block last): the same bits, since the last CTA adds the
        # partials in split order
        first = args["y"].copy()
        args["y"][:] = np.nan
        args["counters"][:] = 0
        emu(args, nrb * count * cta_splits, plan.row_groups * plan.splits, reverse=True)
        assert (args["counters"] == cta_splits).all(), args["counters"]
        np.testing.assert_array_equal(args["y"], first)
    for m in range(count):
        y = (args["y"][:, m * o:(m + 1) * o] if opts.concat else args[f"y_{m}" if m else "y"]).astype(np.float64)
        assert not np.isnan(y).any(), m
        err = _row_err(y, refs[m])
        print(f"layer {m} of {count} ({fused}): max row rel err {err:.2e}")
        assert err < 2e-3, (m, err)


def test_wrong_b_layout_fails_the_register_fragment_check(kernels, tmp_path):
    """The register-fragment form through the same check, with B's two k halves swapped in the PTX model."""
    y, ref = _run(kernels["reg_k4096_r16"], tmp_path, "wrong-b")
    err = _row_err(y, ref)
    print(f"register fragments, wrong-b: max row rel err {err:.2e}")
    assert err > 0.1, err


def test_register_plans_fit_and_cover_the_layer():
    """Every register-fragment plan of the 7B shapes fits the 99 KB of shared memory with its split-sum scratch,
    keeps whole chunks and at least one chunk per split, and launches no more than 16 warps per CTA."""
    from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM
    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, smem_bytes

    for variant in ("v8-k256-256", "v8-k4096-0", "v8-k65536-256"):
        for i, o in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 22016), (1024, 300)):
            for rows in (1, 8, 16):
                cfg = _cfg(variant, i, o, {})
                p = plan_mma_wide(cfg, rows, register_tiles=True)
                length = cfg.group_num * cfg.group_size
                assert p.register_tiles and smem_bytes(cfg, p, rows) <= MAX_DYN_SMEM, (variant, i, o, rows, p)
                assert length % (16 * p.steps_per_load) == 0
                assert length // (16 * p.steps_per_load) >= p.splits and p.row_groups * p.splits <= 16


def test_default_plans_fit_every_arch_and_shape():
    """The registry builds the default plan for every v = 8 layer the switch reaches: it must fit the 99 KB of
    shared memory of sm_86/sm_89 (one library serves every default arch) and whole chunks of its columns."""
    from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM
    from vptq_mlc.tir_kernels.cuda_mma_wide import mma_wide_supported, plan_mma_wide, smem_bytes

    for variant in ("v8-k256-0", "v8-k256-256", "v8-k4096-0", "v8-k4096-4096", "v8-k8192-0", "v8-k65536-0",
                    "v8-k65536-256", "v8-k65536-65536"):
        for i, o in ((4096, 4096), (4096, 11008), (11008, 4096), (14336, 4096), (1024, 300), (8192, 28672)):
            for rows in (6, 8, 11, 16):
                cfg = _cfg(variant, i, o, {})
                assert mma_wide_supported(cfg, "float16", rows)
                p = plan_mma_wide(cfg, rows)
                assert smem_bytes(cfg, p, rows) <= MAX_DYN_SMEM, (variant, i, o, rows, p)
                assert (cfg.group_num * cfg.group_size) % (16 * p.steps_per_load) == 0


def test_launch_shared_memory_needs_no_opt_in_or_gets_it():
    """Past 48 KB of static + dynamic shared memory a launch needs the opt-in attribute, which TVM's CUDA runtime
    sets only for >= 48 KB of dynamic memory (without it: CUDA_ERROR_INVALID_VALUE, seen on the H100 with two pairs
    of vector rows per warp over a 32 KB replicated book). Every default plan and every test plan either fits 48 KB
    or has >= 48 KB dynamic, and the kernel's one dynamic buffer has the padded size."""
    from vptq_mlc.tir_kernels.cuda_mma_wide import (
        OPT_IN_SMEM,
        dynamic_pad,
        launch_smem,
        plan_mma_wide,
        vq_mma_wide_cuda,
    )

    plans = [(_cfg(v, i, o, {}), rows, plan_mma_wide(_cfg(v, i, o, {}), rows))
             for v in ("v8-k256-0", "v8-k256-256", "v8-k4096-0", "v8-k65536-256")
             for i, o in ((4096, 4096), (4096, 11008), (11008, 4096), (1024, 512)) for rows in (5, 8, 16)]
    plans += [(_cfg(v, i, o, lay), rows, replace(plan_mma_wide(_cfg(v, i, o, lay), rows), **ov))
              for v, i, o, rows, lay, ov in CASES.values()]
    padded = 0
    for cfg, rows, p in plans:
        static, dyn = launch_smem(cfg, p, rows)
        assert static <= OPT_IN_SMEM and (static + dyn <= OPT_IN_SMEM or dyn >= OPT_IN_SMEM), (cfg, rows, p)
        if dynamic_pad(cfg, p, rows):
            padded += 1
            script = vq_mma_wide_cuda(cfg, "float16", rows, p).script()
            allocs = re.findall(r'T\.alloc_buffer\(\((\d+),\), "float16x8", scope="shared\.dyn"\)', script)
            assert [int(n) * 16 for n in allocs] == [dyn], (cfg, rows, p, allocs)
    assert padded >= 1  # the two-pairs case of CASES needs the pad


def test_launch_gets_the_dynamic_size_the_plan_computes():
    """The dynamic shared memory TVM's host code passes at launch is `launch_smem`'s. With the book and the
    split-sum scratch as two dynamic buffers, TVM's merge of them sized a v8-k4096-0 launch at 8 rows (2 x 4 warps)
    at 1051648 bytes instead of 64 KB, which the H100 refused; they are one buffer now."""
    import tvm

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_mma_wide import launch_smem, plan_mma_wide, vq_mma_wide_cuda

    (bt,) = resolve_backend("cuda", "sm_90")
    bt.prepare()
    cases = [("v8-k4096-0", 1024, 512, 8, {}), ("v8-k4096-0", 4096, 11008, 12, {}), ("v8-k65536-256", 1024, 512, 8, {}),
             ("v8-k256-0", 1024, 512, 16, {"pair_tiles": 2, "unroll": 1})]
    funcs, expected = {}, {}
    for n, (variant, i, o, rows, ov) in enumerate(cases):
        cfg = _cfg(variant, i, o, {})
        p = replace(plan_mma_wide(cfg, rows), **ov)
        funcs[f"w{n}"] = vq_mma_wide_cuda(cfg, "float16", rows, p).with_attr("global_symbol", f"w{n}")
        expected[f"w{n}"] = launch_smem(cfg, p, rows)[1]
    for name, f in funcs.items():  # one module per kernel: its host function's constants are its own
        ex = tvm.compile(tvm.IRModule({name: f}), target=bt.target)
        host = (ex.mod if hasattr(ex, "mod") else ex).inspect_source()
        consts = {int(c) for c in re.findall(r"\bi(?:32|64) (\d+)", host)}
        assert expected[name] in consts, (name, expected[name], sorted(c for c in consts if c > 4096))


def test_steps_per_load_follow_the_wave_model():
    """Four MMA steps per load unless two make the grid one wave shorter: on the H100 at 16 rows, 11008 x 4096
    (344 CTAs: 2 per SM with 4 steps, 3 with 2) took 39.5 / 30.3 us (v8-k4096-0) and 36.2 / 30.1 us (v8-k256-256)
    with 4 / 2 steps; 4096 x 4096 and 4096 x 11008 (256 CTAs, one wave either way) 14.5 / 14.7 and 28.0 / 30.6 us."""
    from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, waves

    for variant in ("v8-k4096-0", "v8-k256-256"):
        assert plan_mma_wide(_cfg(variant, 4096, 11008, {}), 16).steps_per_load == 2
        for i, o in ((4096, 4096), (11008, 4096)):
            assert plan_mma_wide(_cfg(variant, i, o, {}), 16).steps_per_load == 4
        cfg = _cfg(variant, 4096, 11008, {})
        p = plan_mma_wide(cfg, 16)
        assert waves(cfg, p, 16) == 1 and waves(cfg, replace(p, steps_per_load=4), 16) == 2
    # the book in L1/L2: CTAs are bounded by warps, not shared memory; one wave either way, four steps stay
    assert plan_mma_wide(_cfg("v8-k65536-256", 4096, 11008, {}), 16).steps_per_load == 4


def test_switch_is_on_by_default_and_refuses_bad_values(monkeypatch):
    from vptq_mlc.tir_kernels.cuda_mma_wide import MMA_WIDE_ENV, mma_wide_enabled

    monkeypatch.delenv(MMA_WIDE_ENV, raising=False)
    assert mma_wide_enabled() is True
    monkeypatch.setenv(MMA_WIDE_ENV, "0")
    assert mma_wide_enabled() is False
    monkeypatch.setenv(MMA_WIDE_ENV, "on")
    with pytest.raises(CompileError, match=f"{MMA_WIDE_ENV}='on'"):
        mma_wide_enabled()


def test_registry_takes_it_for_v8_unless_switched_off(monkeypatch):
    """Switch off: the tensor-core decode layers keep cuda_mma.py (same TIR as without this module); on (the
    default): v = 8 layers take the wide kernel, v = 12 keeps cuda_mma.py, and the GEMV rows stay the GEMV."""
    from tvm.target import Target

    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.tir_kernels.cuda_mma import vq_mma_cuda
    from vptq_mlc.tir_kernels.cuda_mma_wide import MMA_WIDE_ENV, vq_mma_wide_cuda
    from vptq_mlc.tir_kernels.registry import CudaKernelSelector

    target = Target({"kind": "cuda", "arch": "sm_90"})
    v8 = VPTQLayerConfig.from_variant("v8-k4096-0", 1024, 512)
    v12 = VPTQLayerConfig.from_variant("v12-k4096-0", 1020, 252)
    monkeypatch.setenv(MMA_WIDE_ENV, "0")
    off = CudaKernelSelector(target)
    assert _same(off(v8, "float16", 16).func, vq_mma_cuda(v8, "float16", 16))
    monkeypatch.delenv(MMA_WIDE_ENV, raising=False)
    on = CudaKernelSelector(target)
    assert _same(on(v8, "float16", 16).func, vq_mma_wide_cuda(v8, "float16", 16))
    assert _same(on(v8, "float16", 8).func, vq_mma_wide_cuda(v8, "float16", 8))
    assert _same(on(v12, "float16", 16).func, vq_mma_cuda(v12, "float16", 16))
    assert "ldmatrix" not in on(v8, "float16", 2).func.script()  # 2 rows: the GEMV


def test_kernels_compile_with_nvcc_in_one_library_next_to_cuda_mma(tmp_path):
    """nvcc builds one library holding wide kernels of several plans (book alone in dynamic shared memory, book +
    split sums, no shared book, replicated) next to `cuda_mma.py` and the GEMV, as a model library does: every
    `extern __shared__` array of a CUDA file shares one name space, so two kernels declaring one name with two types
    fail to compile (a shared book retyped to uint4 by TVM did, under the name `cuda_mma.py` uses)."""
    from test_cuda_aot import require_cuda_toolkit

    require_cuda_toolkit(cuobjdump=False)
    import tvm

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_gemv import vq_gemv_cuda
    from vptq_mlc.tir_kernels.cuda_mma import vq_mma_cuda
    from vptq_mlc.tir_kernels.cuda_mma_wide import vq_mma_wide_cuda

    small, split = _cfg("v8-k256-256", 256, 512, {}), _cfg("v8-k4096-0", 1024, 512, {})
    funcs = {"mma_small": vq_mma_cuda(small, "float16", 16), "gemv_small": vq_gemv_cuda(small, "float16", 2),
             "wide_small": vq_mma_wide_cuda(small, "float16", 16), "wide_split": vq_mma_wide_cuda(split, "float16", 8),
             "wide_global": vq_mma_wide_cuda(_cfg("v8-k65536-256", 1024, 512, {}), "float16", 16),
             "mma_split": vq_mma_cuda(split, "float16", 16)}
    (bt,) = resolve_backend("cuda", "sm_90")
    bt.prepare()
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    tvm.compile(mod, target=bt.target).export_library(str(tmp_path / "k.so"))


def _same(picked, built) -> bool:
    """The registry's PrimFunc is `built` (as the registry marks it: same printed TIR)."""
    from vptq_mlc.tir_kernels.registry import VQKernel, _mark

    return picked.script() == _mark(VQKernel(built, ())).func.script()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_cta_split_suite_plans_fit_and_refuse_the_one_launch_form():
    """`bench build --suite cta-splits`: distinct case names, every plan override fits shared memory and covers
    the layer (each split gets a chunk), the first CTA-split override is `plan_cta_splits`' own plan; CTA splits
    outside the two-launch form of one layer are refused (nothing would zero their counters)."""
    from vptq_mlc.bench.kernels import cta_split_cases
    from vptq_mlc.tir_kernels.cuda_mma import MAX_DYN_SMEM
    from vptq_mlc.tir_kernels.cuda_mma_wide import OPT_IN_SMEM, launch_smem, plan_cta_splits, vq_mma_wide_cuda

    cases = cta_split_cases()
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:
        cfg = c.member_configs()[0]
        if c.plan.get("cta_splits", 1) == 1:
            continue
        base = plan_cta_splits(cfg, c.rows)
        plan = replace(base, **c.plan)
        static, dyn = launch_smem(cfg, plan, c.rows)
        assert static + dyn <= MAX_DYN_SMEM and static <= OPT_IN_SMEM, (c.name, static, dyn)
        chunks = cfg.group_num * cfg.group_size // (16 * plan.steps_per_load)
        assert chunks >= plan.splits * plan.cta_splits, c.name
        if c.plan == {"register_tiles": True, "splits": 8, "cta_splits": 4}:
            assert plan == base, (plan, base)
    cfg = _cfg("v8-k4096-0", 1024, 512, {})
    split = replace(plan_cta_splits(cfg, 16), cta_splits=2)
    with pytest.raises(ValueError, match="CTA splits"):
        vq_mma_wide_cuda(cfg, "float16", 16, split)
