"""GPU: the CUDA build of the compiled sampler (`sample_tokens`, one thread block per row) against the numpy
reference, with the same checks as the CPU test (tests/sampler_checks.py: TV <= 0.02 over 10^5 draws per setting,
greedy == argmax, the reference's token for the same uniform at a 128256-token vocabulary, logprobs within 1e-4).
Needs a CUDA GPU, and either VPTQ_MLC_GPU_E2E (the tiny model's folder: its model-cuda.so carries
`sample_tokens`; a runtime-only TVM loads it) or the TVM compiler (the sampler is built here for the GPU's arch)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
tvm = pytest.importorskip("tvm")
E2E = os.environ.get("VPTQ_MLC_GPU_E2E")


@pytest.fixture(scope="module")
def sampler():
    import sampler_checks as checks

    if E2E:  # the sampler compiled into a model library (loading it brings TVM's CUDA runtime, even runtime-only)
        from vptq_mlc.runtime.device_sampler import DeviceSampler
        from vptq_mlc.runtime.library import load_library

        lib = load_library(Path(E2E) / "model-cuda.so", "cuda")
        return DeviceSampler(lib.func("sample_tokens"), lib.device)
    if not tvm.cuda(0).exist:
        pytest.skip("needs a CUDA GPU (and VPTQ_MLC_GPU_E2E or the TVM compiler)")
    major, minor = (int(v) for v in tvm.cuda(0).compute_version.split("."))
    return checks.build_sampler("cuda", tvm.cuda(0), f"sm_{major}{minor}")


def test_greedy_is_argmax(sampler) -> None:
    import sampler_checks as checks

    checks.check_greedy(sampler, 128256)


def test_distributions_match_reference(sampler) -> None:
    import sampler_checks as checks

    checks.check_distributions(sampler)


def test_same_uniform_gives_reference_token(sampler) -> None:
    import sampler_checks as checks

    checks.check_same_uniform_same_token(sampler, 128256, rows=16)
    checks.check_same_uniform_same_token(sampler, 1000)


def test_logprobs_match_reference(sampler) -> None:
    import sampler_checks as checks

    checks.check_logprobs(sampler, 1000)
    checks.check_logprobs(sampler, 128256)


def test_vocab_limit_and_rows_independent(sampler) -> None:
    import sampler_checks as checks

    checks.check_vocab_limit_and_batch_independence(sampler, 5000)
