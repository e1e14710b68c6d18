"""GPU: the CUDA build of the compiled sampler (`sample_tokens`, one thread block per row) against the numpy
reference, with the same checks as the CPU test (tests/sampler_checks.py: TV <= 0.02 over 10^5 draws per setting,
greedy == argmax, the reference's token for the same uniform at a 128256-token vocabulary, logprobs within 1e-4).
Needs a CUDA GPU and the TVM compiler (the sampler is built here, for the GPU's own arch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(not tvm.cuda(0).exist, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def sampler():
    import sampler_checks as checks

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
