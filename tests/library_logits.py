"""Teacher-forced logits of a compiled library next to the transformers reference, shared by the CPU end-to-end
tests: one prefill of `prefill` tokens, then `decode` single-token steps, each step's last-position logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import tvm
from reference_model import reference_model

from vptq_mlc.runtime.kv_cache import PagedKVCache
from vptq_mlc.runtime.library import load_library, load_params


def library_logits(model_dir: Path, lib_path: Path, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """[1 + len(tokens) - prefill, vocab]: the logits after the prompt and after each fed token."""
    lib = load_library(lib_path, "cpu")
    params = load_params(model_dir, lib)
    kv = PagedKVCache(lib, max_batch=1, max_total_tokens=64, prefill_chunk=prefill)
    embed, prefill_fn, decode = lib.func("embed"), lib.func("prefill"), lib.func("decode")
    reshape = tvm.get_global_func("vm.builtin.reshape")
    ours = []
    kv.add(0)
    steps = [(0, prefill, prefill_fn)] + [(i, 1, decode) for i in range(prefill, len(tokens))]
    for start, n, fn in steps:
        emb = embed(tvm.runtime.tensor(tokens[start : start + n], lib.device), params)
        emb = reshape(emb, tvm.runtime.ShapeTuple([1, n, int(emb.shape[-1])]))
        with kv.forward([0], [n]) as cache:
            ours.append(fn(emb, cache, params)[0].numpy()[0, -1])
    return np.stack(ours)


def assert_logits_match_reference(ckpt: Path, model_dir: Path, lib_path: Path, prefill: int, decode: int,
                                  seed: int) -> None:
    """Random tokens through the library (teacher-forced) and through transformers holding the dense dequantized
    weights: logits within 1e-3 of the logit scale and the same argmax at every step."""
    vocab = load_library(lib_path, "cpu").metadata["params"][0]["shape"][0]
    tokens = np.random.default_rng(seed).integers(0, vocab, prefill + decode).astype(np.int32)
    ours = library_logits(model_dir, lib_path, tokens, prefill)
    with torch.no_grad():
        want = reference_model(ckpt)(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].numpy()
    want = want[prefill - 1 :]
    scale = np.abs(want).max()
    err = np.abs(ours - want).max()
    assert err <= 1e-3 * max(scale, 1.0), f"max abs error {err:.3g} vs logit scale {scale:.3g}"
    assert np.array_equal(ours.argmax(-1), want.argmax(-1))
