"""Issue 3 acceptance on CPU: synthetic VPTQ checkpoint -> convert -> compile (llvm) -> run, against
transformers holding the dense weights dequantized by the independent reference (tests/reference_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cpu_pipeline import build_llvm, run_requests
from library_logits import assert_logits_match_reference, library_logits
from reference_model import reference_greedy, reference_model

from vptq_mlc.compile.build import compile_model
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.library import load_library
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

OUTLIERS = {"outlier_size": 16, "outlier_vector_len": 4, "num_outlier_centroids": 64}
# (arch, variant, layer kwargs, tied embeddings): the variants, packed and unpacked, every architecture
CASES = {
    "llama-v8-k65536-256": ("llama", "v8-k65536-256", {}, False),
    "llama-v8-k65536-0-unpacked": ("llama", "v8-k65536-0", {"is_indice_packed": False}, True),
    "llama-v16-k65536-65536": ("llama", "v16-k65536-65536", {}, False),
    "qwen2-v12-k65536-4096": ("qwen2", "v12-k65536-4096", {}, False),
    "mistral-v8-k4096-4096-outliers": ("mistral", "v8-k4096-4096", {**OUTLIERS, "group_num": 2}, False),
    "llama-v8-k4096-4096-outliers-unpacked": (
        "llama", "v8-k4096-4096", {**OUTLIERS, "is_indice_packed": False, "enable_perm": False}, True),
}
PREFILL, DECODE, GEN = 16, 8, 16


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    arch, variant, kw, tied = CASES[request.param]
    return build_llvm(tmp_path_factory.mktemp(request.param), arch=arch, variant=variant, layer_kwargs=kw,
                      tie_word_embeddings=tied, dtype="float32", seed=7)


def test_logits_match_transformers(built):
    ckpt, model_dir, lib_path = built
    assert_logits_match_reference(ckpt, model_dir, lib_path, PREFILL, DECODE, seed=0)


def test_greedy_matches_transformers(built):
    ckpt, model_dir, lib_path = built
    engine = Engine(model_dir, lib_path, device="cpu")
    prompt = engine.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    ref = reference_model(ckpt)
    want = reference_greedy(ref, prompt, GEN)
    assert run_requests(engine, [prompt], SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True)) == [want]


def test_decode_split_into_static_batches_matches_alone(tmp_path):
    """GPU libraries export `batch_decode_b<n>` for the GEMV kernels' batch sizes and the engine splits a decode
    batch into such pieces; the same path on llvm (static sizes 2 and 3, batch of 5 -> 3 + 2) must give every
    request the tokens it gets alone."""
    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-16", dtype="float32", seed=3)
    model_dir = convert_checkpoint(ckpt, tmp_path / "mlc")
    (lib,) = compile_model(model_dir, "llvm", tmp_path / "m-llvm.so", static_batches=(2, 3))
    engine = Engine(model_dir, lib, device="cpu", max_batch_size=5)
    assert sorted(engine._static_decode) == [1, 2, 3]
    assert [len(p) for p in engine._decode_pieces(list(range(5)))] == [3, 2]
    prompts = [[5 + i, 40 + 3 * i, 7, 99 - i] for i in range(5)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = [run_requests(engine, [p], params)[0] for p in prompts]
    assert run_requests(engine, prompts, params) == alone


def test_metadata_reports_planned_memory(built) -> None:
    """`_metadata.memory_usage` (MLC-LLM's field): the statically planned activation bytes per function; prefill
    plans for prefill_chunk_size tokens, so it needs more than one-token decode."""
    mem = load_library(built[2], "cpu").metadata["memory_usage"]
    assert mem["prefill"] > mem["decode"] > 0 and mem["batch_prefill"] > 0


def test_fp16_embedding_table_in_fp32_model(tmp_path):
    """An fp32 model with its tied embedding table stored in fp16 (convert's `embedding_dtype`, the bundled CPU
    model's choice), rows and head products computed in fp32.
    (1) It computes the model whose table is rounded to fp16: transformers holding that rounded table agrees within
    the usual 1e-3 of the logit scale, with the same argmax at every step.
    (2) Against the unrounded fp32 reference the rounding stays within its bound: an fp16 entry is within 2^-11 of
    itself (relative; the synthetic table is far from fp16's subnormals), so the head moves logit r by at most
    B_r = 2^-11 * sum_k |h_k W_rk| (h: the final hidden state), and the rounded input row, renormalized by the
    decoder's RMSNorms, moves it by about as much again: |ours - fp32 reference| <= 2 * max_r B_r plus the 1e-3
    tolerance of (1)."""
    from reference_model import reference_model

    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-16", tie_word_embeddings=True,
                                     dtype="float32", seed=11)
    model_dir = convert_checkpoint(ckpt, tmp_path / "mlc", embedding_dtype="float16")
    (lib,) = compile_model(model_dir, "llvm", tmp_path / "m-llvm.so")
    prefill, decode = 8, 4
    tokens = np.random.default_rng(1).integers(0, 512, prefill + decode).astype(np.int32)
    ours = library_logits(model_dir, lib, tokens, prefill)

    fp32_ref = reference_model(ckpt)
    rounded_ref = reference_model(ckpt)
    table = rounded_ref.model.embed_tokens.weight
    with torch.no_grad():
        table.copy_(table.half().float())
        assert rounded_ref.lm_head.weight.data_ptr() == table.data_ptr()  # tied: the head reads the same table
        hidden = []
        rounded_ref.model.norm.register_forward_hook(lambda _m, _i, out: hidden.append(out[0, prefill - 1:]))
        ids = torch.from_numpy(tokens[None].astype(np.int64))
        want16 = rounded_ref(ids).logits[0, prefill - 1:].numpy()
        want32 = fp32_ref(ids).logits[0, prefill - 1:].numpy()
    scale = np.abs(want32).max()
    tol = 1e-3 * max(scale, 1.0)
    assert np.abs(ours - want16).max() <= tol
    assert np.array_equal(ours.argmax(-1), want16.argmax(-1))

    w32 = fp32_ref.model.embed_tokens.weight.detach().numpy()
    head_bound = (2.0**-11 * np.abs(hidden[0].numpy()) @ np.abs(w32).T).max()
    err, computed = np.abs(ours - want32).max(), np.abs(ours - want16).max()
    assert err <= 2 * head_bound + computed, f"max |ours - fp32| {err:.3g} > 2 * {head_bound:.3g} + {computed:.3g}"
    records = json.loads((model_dir / "tensor-cache.json").read_text())["records"]
    dtypes = {r["name"]: r["dtype"] for shard in records for r in shard["records"]}
    assert dtypes["model.embed_tokens.weight"] == "float16" and dtypes["model.norm.weight"] == "float32"


def test_fp16_tables_of_fp16_checkpoint_are_lossless(tmp_path):
    """The bundled CPU model's conversion (vptq_mlc/bundled.py): an fp16 checkpoint converted to an fp32 model with
    its embedding table and VQ codebooks kept in fp16. The checkpoint holds them in fp16, so nothing is rounded:
    the logits are those of the all-fp32 conversion of the same checkpoint, and match transformers in fp32."""
    from reference_model import reference_model

    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-16", tie_word_embeddings=True,
                                     dtype="float16", seed=5)
    wide = convert_checkpoint(ckpt, tmp_path / "fp32", dtype="float32")
    narrow = convert_checkpoint(ckpt, tmp_path / "tables16", dtype="float32", embedding_dtype="float16",
                                codebook_dtype="float16", layout="generic")
    records = json.loads((narrow / "tensor-cache.json").read_text())["records"]
    dtypes = {r["name"]: r["dtype"] for shard in records for r in shard["records"]}
    assert {d for n, d in dtypes.items() if n.endswith("centroids")} == {"float16"}
    assert dtypes["model.embed_tokens.weight"] == "float16" and dtypes["model.norm.weight"] == "float32"
    prefill, decode = 8, 4
    tokens = np.random.default_rng(2).integers(0, 512, prefill + decode).astype(np.int32)
    (wide_lib,) = compile_model(wide, "llvm", tmp_path / "fp32.so")
    (narrow_lib,) = compile_model(narrow, "llvm", tmp_path / "tables16.so")
    ours = library_logits(narrow, narrow_lib, tokens, prefill)
    np.testing.assert_allclose(ours, library_logits(wide, wide_lib, tokens, prefill), rtol=0, atol=1e-5)
    with torch.no_grad():
        want = reference_model(ckpt)(torch.from_numpy(tokens[None].astype(np.int64))).logits[0, prefill - 1:].numpy()
    assert np.abs(ours - want).max() <= 1e-3 * max(np.abs(want).max(), 1.0)
    assert np.array_equal(ours.argmax(-1), want.argmax(-1))
