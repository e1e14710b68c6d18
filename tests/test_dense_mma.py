"""Dense fp16 tensor-core GEMM on CUDA (vptq_mlc/tir_kernels/cuda_dense_mma.py): which PrimFuncs the pipeline
replaces, that the kernels are tensor-core code (mma.sync / ldmatrix / cp.async), and that an fp16 model's CUDA
library runs no other matmul (but dlight's 1-row GEMV). TVM codegen only (CUDA source captured, nvcc not run;
tests/test_cuda_aot.py builds the fatbin for sm_80 + sm_90 of a model whose lm_head uses these kernels). The kernel's
numbers are checked on the H100 by bench/dense_mma.py (every output row against an fp32 reference), and on the CPU
the schedule's data movement is emulated with the PTX fragment layouts against numpy. ~90 s on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cuda_sources import generated_cuda, kernel_definitions
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


@pytest.mark.parametrize("grid_m,grid_n,group_m", [(16, 32, 4), (13, 86, 4), (4, 250, 16), (1, 7, 8), (5, 3, 2)])
def test_grouped_rasterization_visits_every_tile_once(grid_m, grid_n, group_m):
    """`grouped_tile` (DensePlan.group_m > 0) maps CTA ids 0..M*N-1 onto every (column, row) tile exactly once,
    with consecutive CTAs inside a group of `group_m` row tiles (a partial last group included)."""
    from vptq_mlc.tir_kernels.cuda_common import grouped_tile

    seen = []
    for tb in range(grid_m * grid_n):
        rows = min(grid_m - tb // (group_m * grid_n) * group_m, group_m)
        bx, by = grouped_tile(tb, grid_n, group_m, rows)
        assert 0 <= bx < grid_n and 0 <= by < grid_m
        assert by // group_m == tb // (group_m * grid_n)  # the CTA stays in its group of row tiles
        seen.append((bx, by))
    assert sorted(seen) == [(x, y) for x in range(grid_n) for y in range(grid_m)]


def _ldmatrix_x4(ring, addr):
    """PTX `ldmatrix.sync.aligned.m8n8.x4.b16`: lanes 8m..8m+7 give the row addresses of matrix m; lane t receives
    row t/4, elements 2(t%4) and 2(t%4)+1 of each matrix m in register m. Returns (32 lanes, 8 halves)."""
    lane = np.arange(32)
    rows = np.stack([ring[addr[:, None] + np.arange(8)]])[0]  # (32 addresses, 8 halves)
    out = np.empty((32, 8), ring.dtype)
    for m in range(4):
        for h in range(2):
            out[:, 2 * m + h] = rows[8 * m + lane // 4, 2 * (lane % 4) + h]
    return out


def _mma_m16n8k16(a, b, c):
    """PTX `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32` with its documented fragment layouts (g = lane/4,
    q = lane%4): A a0,a1 (g, 2q..) a2,a3 (g+8, 2q..) a4,a5 (g, 2q+8..) a6,a7 (g+8, 2q+8..); B b0,b1 (k 2q.., n g)
    b2,b3 (k 2q+8.., n g); C/D c0,c1 (g, 2q..) c2,c3 (g+8, 2q..)."""
    lane = np.arange(32)
    g, q = lane // 4, lane % 4
    A, B, C = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32), np.zeros((16, 8), np.float32)
    for h in range(2):
        A[g, 2 * q + h], A[g + 8, 2 * q + h] = a[:, h], a[:, 2 + h]
        A[g, 2 * q + 8 + h], A[g + 8, 2 * q + 8 + h] = a[:, 4 + h], a[:, 6 + h]
        B[2 * q + h, g], B[2 * q + 8 + h, g] = b[:, h], b[:, 2 + h]
        C[g, 2 * q + h], C[g + 8, 2 * q + h] = c[:, h], c[:, 2 + h]
    D = A @ B + C
    d = np.empty((32, 4), np.float32)
    for h in range(2):
        d[:, h], d[:, 2 + h] = D[g, 2 * q + h], D[g + 8, 2 * q + h]
    return d


def _emulate(plan, x, w):
    """y = x @ w.T computed the way the kernel of `plan` moves data (its TileLayout: clamped rows, swizzled ring
    slots, ldmatrix row addresses, split-K sum, accumulator -> output mapping), with the PTX semantics above."""
    from vptq_mlc.tir_kernels.cuda_dense_mma import TileLayout

    lay, p = TileLayout(plan), plan
    (M, K), N = x.shape, w.shape[0]
    BM, BN, BKC, CR = p.block_m, p.block_n, p.block_k, p.block_k // 8
    lane = np.arange(32)
    y = np.full((M, N), np.nan, np.float32)
    warps = [(ty // (p.warps_k * p.warps_n), ty // p.warps_k % p.warps_n, ty % p.warps_k)
             for ty in range(p.warps_m * p.warps_n * p.warps_k)]  # (wm, wn, wk)
    for by in range(-(-M // BM)):
        for bx in range(-(-N // BN)):
            ring = np.full(p.stages * (BM + BN) * BKC, np.nan, np.float16)  # NaN: a read of an unwritten slot shows
            acc = np.zeros((len(warps), p.m_tiles, p.n_tiles, 32, 4), np.float32)
            for kt in range(K // BKC):
                slot = kt % p.stages
                for rows, src, base, slot_of in ((BM, x, by * BM, lay.x_slot), (BN, w, bx * BN, lay.w_slot)):
                    t = np.arange(rows * CR)
                    dst = slot_of(slot, t // CR, t % CR)
                    src_row = np.minimum(base + t // CR, src.shape[0] - 1)
                    for e in range(8):
                        ring[dst + e] = src[src_row, kt * BKC + t % CR * 8 + e]
                for ty, (wm, wn, wk) in enumerate(warps):
                    for kk in range(p.k_slice // 16):
                        fa = [_ldmatrix_x4(ring, lay.x_frag(slot, wm, wk, i, kk, lane)) for i in range(p.m_tiles)]
                        fb = [_ldmatrix_x4(ring, lay.w_frag(slot, wn, wk, j, kk, lane)) for j in range(p.n_tiles // 2)]
                        for i in range(p.m_tiles):
                            for j in range(p.n_tiles):
                                b = fb[j // 2][:, (j % 2) * 4:(j % 2) * 4 + 4]
                                acc[ty, i, j] = _mma_m16n8k16(fa[i], b, acc[ty, i, j])
            for wm, wn, wk in warps:
                if wk:
                    continue
                tot = sum(acc[t2] for t2, (m2, n2, _) in enumerate(warps) if (m2, n2) == (wm, wn))
                for i in range(p.m_tiles):
                    for j in range(p.n_tiles):
                        for c in range(4):
                            r, col = by * BM + lay.out_row(wm, i, lane, c), bx * BN + lay.out_col(wn, j, lane, c)
                            ok = (r < M) & (col < N)
                            y[r[ok], col[ok]] = tot[i, j, ok, c]
    return y


@pytest.mark.parametrize("name", ["DECODE_WIDE_PLAN", "DECODE_PLAN", "SMALL_PREFILL_PLAN", "PREFILL_PLAN",
                                  "PREFILL_PLAN_BK32"])
def test_schedule_computes_x_wt_on_cpu(name):
    """The kernel's data movement, emulated in numpy with the PTX ISA's ldmatrix/mma fragment layouts, gives
    x @ w.T (float64 numpy) for every row, with partial row and column tiles."""
    from vptq_mlc.tir_kernels import cuda_dense_mma as dm

    plan = getattr(dm, name)
    rng = np.random.default_rng(0)
    m = 5 if plan.block_m == 16 else plan.block_m + 3
    n, k = plan.block_n + 8, 2 * plan.block_k
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = rng.standard_normal((n, k)).astype(np.float16)
    y = _emulate(plan, x, w)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert not np.isnan(y).any()
    row_err = np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert row_err.max() < 1e-5, row_err.max()


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
    kernels = kernel_definitions(generated_cuda(lambda bt: tvm.compile(mod, target=bt.target)))
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

    def build_recording(bt):  # the backend's pipeline, keeping what it lowered
        pipeline = bt.relax_pipeline

        def recording_pipeline():
            def run(mod):
                lowered["mod"] = pipeline()(mod)
                return lowered["mod"]
            return run

        bt.relax_pipeline = recording_pipeline
        return build_library(model, bt, tmp_path / "fp16-cuda.so")

    kernels = kernel_definitions(generated_cuda(build_recording))
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
