"""The split-KV decode attention (tir_kernels/cuda_attention_decode.py, compiled in unless VPTQ_MLC_DECODE_ATTN=0):
its generated CUDA, run on the CPU (tests/decode_attn_emulator.py), against a float64 attention over paged K/V
with ragged lengths; a deliberately wrong build (no rescale of the running sums) must fail the same check; and the
pass that hands the kernel to the paged KV cache (off by default: the module is left as it was). The GPU check and
timing against TVM's kernel is bench/attention_decode.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

PAGE = 16
D = 128  # the head width of every model the kernel is for (fp16, 16 lanes a key)


def _source(h_kv: int, h_q: int, d: int, rescale: bool = True) -> str:
    """The CUDA TVM generates for the kernel (common subexpressions not hoisted: kernels take the shape vars)."""
    from cuda_sources import generated_cuda

    from vptq_mlc.tir_kernels.cuda_attention_decode import paged_decode_split_kv

    def build(bt):
        f = paged_decode_split_kv(h_kv, h_q, d, "float16", PAGE, rescale=rescale)
        with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            tvm.compile(tvm.IRModule({"decode": f.with_attr("global_symbol", "decode")}), target=bt.target)

    return generated_cuda(build, "sm_90")


_EMULATORS: dict = {}


def _emulator(h_kv: int, h_q: int, d: int, tmp_path_factory, rescale: bool = True):
    from decode_attn_emulator import EmulatedKernels

    key = (h_kv, h_q, d, rescale)
    if key not in _EMULATORS:
        _EMULATORS[key] = EmulatedKernels(_source(h_kv, h_q, d, rescale), tmp_path_factory.mktemp("decode"))
    return _EMULATORS[key]


def _inputs(kv_lens, h_kv: int, h_q: int, d: int, rng) -> dict[str, np.ndarray]:
    """q and a page pool with each sequence's pages scattered in random order (and spare pages between)."""
    n_pages = [-(-k // PAGE) for k in kv_lens]
    pool = sum(n_pages) + 5
    page_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    return {
        "q": rng.standard_normal((len(kv_lens), h_q, d)).astype(np.float16),
        # a wide spread of scores, so a missing rescale of the running sums cannot hide
        "pages": (rng.standard_normal((pool, 2, h_kv, PAGE, d)) * 2).astype(np.float16),
        "page_indptr": page_indptr,
        "page_values": rng.permutation(pool)[: page_indptr[-1]].astype(np.int32),
        "length_info": np.array([k - (n - 1) * PAGE if n else 0 for k, n in zip(kv_lens, n_pages)], np.int32),
    }


def _reference(x, kv_lens, h_kv: int, h_q: int, sm_scale: float):
    """float64 softmax(q K^T * sm_scale) V per (sequence, head) and its log2-sum-exp (TVM's lse base)."""
    batch, _, d = x["q"].shape
    out, lse = np.zeros((batch, h_q, d)), np.zeros((batch, h_q))
    for b, kv in enumerate(kv_lens):
        pages = x["page_values"][x["page_indptr"][b]: x["page_indptr"][b + 1]]
        idx = np.arange(kv)
        k = x["pages"][pages[idx // PAGE], 0, :, idx % PAGE].astype(np.float64)
        v = x["pages"][pages[idx // PAGE], 1, :, idx % PAGE].astype(np.float64)
        for h in range(h_q):
            s = k[:, h // (h_q // h_kv)] @ x["q"][b, h].astype(np.float64) * sm_scale
            p = np.exp(s - s.max())
            out[b, h] = p @ v[:, h // (h_q // h_kv)] / p.sum()
            lse[b, h] = (s.max() + math.log(p.sum())) / math.log(2)
    return out, lse


def _run(emu, x, h_kv: int, h_q: int, sm_scale: float):
    """Both launches with the grids the host code computes (`num_splits` of the same shapes)."""
    from vptq_mlc.tir_kernels.cuda_attention_decode import MERGE_ROWS_PER_CTA, IntOps, num_splits, workspace_rows

    batch, _, d = x["q"].shape
    splits = num_splits(batch, len(x["page_values"]), h_kv, PAGE, IntOps)
    args = dict(x)
    args["output"] = np.full((batch, h_q, d), np.nan, np.float16)
    args["lse"] = np.full((batch, h_q), np.nan, np.float32)
    args["o_part"] = np.full((workspace_rows(h_kv), h_q, d), np.nan, np.float32)
    args["lse_part"] = np.full((workspace_rows(h_kv), h_q), np.nan, np.float32)
    args.update(batch=batch, nnz_pages=len(x["page_values"]), max_num_pages=x["pages"].shape[0], sm_scale=sm_scale,
                length_info_elem_offset=0, page_indptr_elem_offset=0, page_values_elem_offset=0, pages_elem_offset=0)
    first, merge = emu.kernels
    emu.launch(first, (batch, h_kv, splits), (32, 4), args)
    merge_ctas = -(-batch * h_q // MERGE_ROWS_PER_CTA) if splits > 1 else 1
    emu.launch(merge, (merge_ctas, 1, 1), (math.gcd(d, 32), MERGE_ROWS_PER_CTA), args)
    return args["output"].astype(np.float64), args["lse"].astype(np.float64), splits


def _row_errors(got_o, got_lse, ref_o, ref_lse):
    err = np.linalg.norm(got_o - ref_o, axis=-1) / np.linalg.norm(ref_o, axis=-1)
    return err, np.abs(got_lse - ref_lse)


# (kv heads, query heads, cached lengths): MHA and GQA 4:1, batches 1, 3 and 16, lengths from 1 to past 1000
CASES = [
    (2, 8, (1000,)),  # one sequence, GQA 4:1: many slices, merged by the second launch
    (4, 4, (7,)),  # MHA, one partial page: one slice, written directly
    (2, 8, (1, 7, 128)),  # few pages in all: one slice each
    (4, 4, (1, 7, 1100)),  # MHA: slices, one of them ragged, empty slices for the short sequences
    (2, 8, (1, 2, 7, 16, 17, 31, 33, 64, 65, 100, 128, 129, 200, 5, 1030, 3)),  # batch 16, GQA 4:1
]


@pytest.mark.parametrize("h_kv,h_q,kv_lens", CASES)
def test_generated_cuda_matches_float64_attention(h_kv, h_q, kv_lens, tmp_path_factory):
    rng = np.random.default_rng(len(kv_lens) * 7 + h_kv)
    x = _inputs(kv_lens, h_kv, h_q, D, rng)
    sm_scale = D ** -0.5
    got_o, got_lse, splits = _run(_emulator(h_kv, h_q, D, tmp_path_factory), x, h_kv, h_q, sm_scale)
    ref_o, ref_lse = _reference(x, kv_lens, h_kv, h_q, sm_scale)
    err, lse_err = _row_errors(got_o, got_lse, ref_o, ref_lse)
    # fp16 output rounding is ~3e-4 relative per row; a wrong weight or a lost key is far above 2e-3
    assert np.isfinite(got_o).all() and np.isfinite(got_lse).all()
    assert err.max() <= 2e-3, (splits, err.max(axis=-1))
    assert lse_err.max() <= 2e-3, (splits, lse_err.max(axis=-1))


def test_attention_scale_is_applied(tmp_path_factory):
    """sm_scale is used as given (the runtime computes it): another scale, the rows of that scale."""
    h_kv, h_q, kv_lens = 2, 8, (1, 7, 128)
    x = _inputs(kv_lens, h_kv, h_q, D, np.random.default_rng(3))
    got_o, got_lse, _ = _run(_emulator(h_kv, h_q, D, tmp_path_factory), x, h_kv, h_q, 0.3)
    ref_o, ref_lse = _reference(x, kv_lens, h_kv, h_q, 0.3)
    err, lse_err = _row_errors(got_o, got_lse, ref_o, ref_lse)
    assert err.max() <= 2e-3 and lse_err.max() <= 2e-3


@pytest.mark.parametrize("h_kv,h_q,kv_lens", [(2, 8, (1000,)), (4, 4, (1, 7, 128))])
def test_a_kernel_without_the_rescale_fails_the_check(h_kv, h_q, kv_lens, tmp_path_factory):
    """The check has teeth: running sums not rescaled when the running max grows give rows far off."""
    x = _inputs(kv_lens, h_kv, h_q, D, np.random.default_rng(11))
    got_o, got_lse, _ = _run(_emulator(h_kv, h_q, D, tmp_path_factory, rescale=False), x, h_kv, h_q, D ** -0.5)
    ref_o, ref_lse = _reference(x, kv_lens, h_kv, h_q, D ** -0.5)
    err, lse_err = _row_errors(got_o, got_lse, ref_o, ref_lse)
    assert err.max() > 1e-1 or lse_err.max() > 1e-1


def test_generated_cuda_uses_16_byte_copies():
    src = _source(8, 32, D)
    assert "cp_async_cg_async_cg_shared_global_16" in src
    assert "__shfl_xor_sync" in src


def test_splits_follow_the_shapes():
    """Enough slices for ~TARGET_CTAS CTAs at small batches, one at large ones, never more than MAX_SPLITS, and
    the workspace always holds batch * splits rows."""
    from vptq_mlc.tir_kernels.cuda_attention_decode import MAX_SPLITS, IntOps, num_splits, workspace_rows

    assert num_splits(1, 8, 32, PAGE, IntOps) == 4  # 128 tokens: 32 keys a slice
    assert num_splits(1, 128, 32, PAGE, IntOps) == 9  # 2048 tokens: 288 CTAs
    assert num_splits(16, 16 * 128, 32, PAGE, IntOps) == 1  # 512 CTAs already
    assert num_splits(1, 512, 8, PAGE, IntOps) == MAX_SPLITS
    for h_kv in (1, 2, 4, 8, 32, 40):
        for batch in range(1, 300):
            splits = num_splits(batch, batch * 1000, h_kv, PAGE, IntOps)
            assert splits == 1 or batch * splits <= workspace_rows(h_kv)


def _cache_module(h_kv: int, h_q: int, d: int):
    from test_attention_split_kv import _cache_module as cache_module

    return cache_module(h_kv, h_q, d)


def _symbols(mod):
    from test_attention_split_kv import _symbols as symbols

    return symbols(mod)


def test_switch_off_leaves_the_module_alone(monkeypatch):
    from vptq_mlc.tir_kernels.cuda_attention_decode import DECODE_ATTN_ENV, decode_attn_pass

    monkeypatch.setenv(DECODE_ATTN_ENV, "0")
    mod = _cache_module(2, 8, 128)
    assert decode_attn_pass()(mod).same_as(mod)


def test_switch_is_on_by_default(monkeypatch):
    from vptq_mlc.tir_kernels.cuda_attention_decode import DECODE_ATTN_ENV, DECODE_SYMBOL, decode_attn_pass

    monkeypatch.delenv(DECODE_ATTN_ENV, raising=False)
    assert DECODE_SYMBOL in decode_attn_pass()(_cache_module(2, 8, 128))["create"].script()


def test_a_bad_switch_value_is_a_compile_error_before_any_pass_runs(monkeypatch):
    from vptq_mlc.errors import CompileError
    from vptq_mlc.tir_kernels.cuda_attention_decode import DECODE_ATTN_ENV, decode_attn_pass

    monkeypatch.setenv(DECODE_ATTN_ENV, "on")
    with pytest.raises(CompileError, match=f"{DECODE_ATTN_ENV}='on'"):
        decode_attn_pass()


@pytest.mark.parametrize("h_kv,h_q,d", [(2, 8, 128), (4, 4, 64)])
def test_switch_on_creates_the_cache_with_our_decode_kernel(monkeypatch, h_kv, h_q, d):
    from vptq_mlc.tir_kernels.cuda_attention_decode import DECODE_ATTN_ENV, DECODE_SYMBOL, decode_attn_pass

    monkeypatch.setenv(DECODE_ATTN_ENV, "1")
    mod = _cache_module(h_kv, h_q, d)
    out = decode_attn_pass()(mod)
    before, after = _symbols(mod), _symbols(out)
    assert set(before) - set(after) == {"batch_decode_paged_kv"}  # the sliding-window kernel stays TVM's
    assert set(after) - set(before) == {DECODE_SYMBOL}
    assert DECODE_SYMBOL in out["create"].script()
    new, old = after[DECODE_SYMBOL], before["batch_decode_paged_kv"]
    assert len(new.params) == len(old.params)
    assert [int(s) for s in new.params[1].shape[2:]] == [h_kv, PAGE, d]


def test_cuda_pipeline_runs_the_pass():
    from vptq_mlc.compile.targets import resolve_backend

    (bt,) = resolve_backend("cuda", "sm_90")
    assert "VPTQSplitKVDecode" in [p.info.name for p in bt.passes()]
