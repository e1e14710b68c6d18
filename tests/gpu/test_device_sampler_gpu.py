"""GPU: the CUDA build of the compiled sampler (`sample_tokens`, compile/sampler.py `gpu_kernel`) against the numpy
reference, with the same checks as the CPU test (tests/sampler_checks.py: TV <= 0.02 over 10^5 draws per setting,
greedy == argmax, the reference's token for the same uniform at a 128256-token vocabulary, logprobs within 1e-4).
Needs a CUDA GPU, and either VPTQ_MLC_GPU_SAMPLER_ALONE (the sampler alone, from `bench sampler --build`),
VPTQ_MLC_GPU_E2E (the tiny model's folder: its model-cuda.so carries `sample_tokens`; a runtime-only TVM loads
either) or the TVM compiler (the sampler is built here for the GPU's arch)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
tvm = pytest.importorskip("tvm")
E2E = os.environ.get("VPTQ_MLC_GPU_E2E")
# A model library whose sample_tokens to test (default: the tiny model's) and its vocabulary (default: the tiny
# model's): the library's memory plan bounds the rows (its max batch) and the vocabulary of a call.
LIB = os.environ.get("VPTQ_MLC_GPU_SAMPLER_LIB") or (str(Path(E2E) / "model-cuda.so") if E2E else None)
# Or the sampler alone (`vptq-mlc bench sampler --build FILE --device cuda --arch sm_90`): no memory plan, so any
# vocabulary and rows; a runtime-only TVM loads it too.
ALONE = os.environ.get("VPTQ_MLC_GPU_SAMPLER_ALONE")
BIG_VOCAB = 128256


@pytest.fixture(scope="module")
def bounded():
    """(sampler, largest vocabulary, most rows per call) it may be called with."""
    import sampler_checks as checks

    if ALONE:
        from vptq_mlc.bench.sampler import library_sampler
        from vptq_mlc.runtime.device_sampler import DeviceSampler

        _, dev, func = library_sampler(ALONE, "cuda")
        return DeviceSampler(func, dev), BIG_VOCAB, 25_000
    if LIB:  # the sampler compiled into a model library (loading it brings TVM's CUDA runtime, even runtime-only)
        from vptq_mlc.artifact.chat_config import ChatConfig
        from vptq_mlc.runtime.device_sampler import DeviceSampler
        from vptq_mlc.runtime.library import load_library

        lib = load_library(LIB, "cuda")
        vocab = int(os.environ.get("VPTQ_MLC_GPU_SAMPLER_VOCAB") or ChatConfig.load(Path(E2E) / "model").vocab_size)
        return DeviceSampler(lib.func("sample_tokens"), lib.device), vocab, int(lib.metadata["max_batch_size"])
    if not tvm.cuda(0).exist:
        pytest.skip("needs a CUDA GPU (and VPTQ_MLC_GPU_E2E / VPTQ_MLC_GPU_SAMPLER_LIB or the TVM compiler)")
    if getattr(tvm.base, "_RUNTIME_ONLY", False):  # a GPU but no compiler: the artifact to test must be given
        pytest.fail("runtime-only TVM cannot build the sampler: set VPTQ_MLC_GPU_E2E, VPTQ_MLC_GPU_SAMPLER_LIB or "
                    "VPTQ_MLC_GPU_SAMPLER_ALONE (vptq-mlc bench sampler --build FILE --device cuda)")
    major, minor = (int(v) for v in tvm.cuda(0).compute_version.split("."))
    return checks.build_sampler("cuda", tvm.cuda(0), f"sm_{major}{minor}"), BIG_VOCAB, 25_000


def test_greedy_is_argmax(bounded) -> None:
    import sampler_checks as checks

    sampler, vocab, _ = bounded
    checks.check_greedy(sampler, min(vocab, BIG_VOCAB))


def test_distributions_match_reference(bounded) -> None:
    import sampler_checks as checks

    sampler, _, rows = bounded
    checks.check_distributions(sampler, chunk=rows)


def test_same_uniform_gives_reference_token(bounded) -> None:
    import sampler_checks as checks

    sampler, vocab, rows = bounded
    checks.check_same_uniform_same_token(sampler, min(vocab, BIG_VOCAB), rows=min(rows, 16))
    checks.check_same_uniform_same_token(sampler, min(vocab, 1000), rows=min(rows, 64))


def test_logprobs_match_reference(bounded) -> None:
    import sampler_checks as checks

    sampler, vocab, _ = bounded
    checks.check_logprobs(sampler, min(vocab, 1000))
    checks.check_logprobs(sampler, min(vocab, BIG_VOCAB))


def test_vocab_limit_and_rows_independent(bounded) -> None:
    import sampler_checks as checks

    sampler, vocab, _ = bounded
    checks.check_vocab_limit_and_batch_independence(sampler, min(vocab, 5000))


def test_settings_and_profiles_give_reference_token(bounded) -> None:
    """With the reference's uniforms, the reference's tokens: every setting at a 3000-token vocabulary, and bench
    sampler's peaked and flat logits under model-like settings at 128256 (the compaction, the direct ranking of
    up to 512 candidates and the key search over more)."""
    import sampler_checks as checks

    sampler, vocab, rows = bounded
    checks.check_settings_same_uniform(sampler, min(vocab, 3000), uniforms=min(rows, 8))
    checks.check_profiles_same_uniform(sampler, min(vocab, BIG_VOCAB), rows=min(rows, 2))


def test_tied_logits_give_tie_rule_token(bounded) -> None:
    """bench e2e's random-weight logits (every score tied with hundreds of others, tens of thousands of tokens in
    the nucleus: the multi-block top-p search) at the model's default settings: the token of the tie rule's cdf."""
    import sampler_checks as checks

    sampler, vocab, rows = bounded
    checks.check_tied_logits_same_uniform(sampler, min(vocab, BIG_VOCAB), rows=min(rows, 2), uniforms=4)


def test_rows_change_hands(bounded) -> None:
    """The sampler's kept device buffers across calls whose rows pass between settings: the reference's tokens."""
    import sampler_checks as checks

    sampler, _, rows = bounded
    checks.check_rows_change_hands(sampler, rows=min(rows, 8))
