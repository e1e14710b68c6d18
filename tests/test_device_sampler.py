"""The sampler compiled into model libraries, on the CPU, against the numpy reference (checks in sampler_checks)."""

from __future__ import annotations

import pytest
import sampler_checks as checks
import tvm

from vptq_mlc.runtime.device_sampler import counter_uniform


@pytest.fixture(scope="module")
def sampler() -> checks.DeviceSampler:
    return checks.build_sampler("llvm", tvm.cpu())


def test_greedy_is_argmax(sampler: checks.DeviceSampler) -> None:
    checks.check_greedy(sampler, 128256)


def test_distributions_match_reference(sampler: checks.DeviceSampler) -> None:
    checks.check_distributions(sampler)


def test_same_uniform_gives_reference_token(sampler: checks.DeviceSampler) -> None:
    checks.check_same_uniform_same_token(sampler, 128256, rows=8)
    checks.check_same_uniform_same_token(sampler, 1000)


def test_logprobs_match_reference(sampler: checks.DeviceSampler) -> None:
    checks.check_logprobs(sampler, 1000)


def test_vocab_limit_and_rows_independent(sampler: checks.DeviceSampler) -> None:
    checks.check_vocab_limit_and_batch_independence(sampler, 500)


def test_counter_uniform() -> None:
    """Depends only on (seed, step), stays in [0, 1) and looks uniform (Kolmogorov-Smirnov distance of 10^4)."""
    import numpy as np

    assert counter_uniform(7, 3) == counter_uniform(7, 3) != counter_uniform(7, 4) != counter_uniform(8, 3)
    u = np.sort([counter_uniform(12345, t) for t in range(10_000)])
    assert 0 <= u[0] and u[-1] < 1
    ks = np.max(np.abs(u - (np.arange(1, u.size + 1) / u.size)))
    assert ks < 1.63 / np.sqrt(u.size)  # the 1% critical value


def test_gpu_kernel_builds_for_cuda(tmp_path) -> None:
    """The block-per-row kernel passes TVM's CUDA lowering (shared-memory sync planning) and nvcc; it runs in
    tests/gpu/test_device_sampler_gpu.py."""
    from tvm import relax

    from vptq_mlc.compile.cuda import find_nvcc
    from vptq_mlc.compile.sampler import add_sampler
    from vptq_mlc.compile.targets import relax_pipeline, resolve_targets
    from vptq_mlc.errors import VPTQMLCError

    try:
        find_nvcc()
    except VPTQMLCError:
        pytest.skip("needs nvcc")
    bt = resolve_targets("cuda", "sm_90")[0]
    bt.prepare()
    with bt.target:
        mod = relax_pipeline(bt.target)(add_sampler(tvm.IRModule(), bt.target))
    relax.build(mod, bt.target, relax_pipeline=None).export_library(str(tmp_path / "sampler.so"))
    assert (tmp_path / "sampler.so").stat().st_size > 0
