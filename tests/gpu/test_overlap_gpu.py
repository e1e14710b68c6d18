"""GPU: overlapped decoding on CUDA (runtime/engine.py `overlap`, runtime/async_copy.py).

The overlapped engine queues step t+1, fed the tokens the sampler left on the device, before it reads step t's back
through page-locked buffers; every call runs the same kernels on the same inputs as reading each step first, so the
tokens must be identical (the CUDA kernels themselves are checked against the CPU library in
test_runtime_engine_gpu.py, and the CPU library against transformers in CI). The page-locked read and upload are
also checked against TVM's synchronous copies.

Uses the VPTQ_MLC_GPU_E2E folder (`model/`, `model-cuda.so`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

E2E = os.environ.get("VPTQ_MLC_GPU_E2E")
pytestmark = pytest.mark.skipif(not E2E, reason="set VPTQ_MLC_GPU_E2E to a folder with model/, model-cuda.so")


def _prompts(n: int) -> list[list[int]]:
    return [[(7 + 13 * i + 31 * j) % 500 + 1 for j in range(3 + i % 5)] for i in range(n)]


@pytest.fixture(scope="module")
def engines():  # noqa: ANN201
    from vptq_mlc.runtime import Engine

    d = Path(E2E)  # loading the library brings TVM's CUDA runtime (a runtime-only TVM has none before)
    overlapped = Engine(d / "model", d / "model-cuda.so", device="cuda", max_batch_size=16)
    stepwise = Engine(d / "model", d / "model-cuda.so", device="cuda", max_batch_size=16, overlap=False)
    return overlapped, stepwise


def _run(engine, prompts, params_for) -> tuple[list[list[int]], int]:  # noqa: ANN001
    reqs = [engine.add_request(p, params_for(i)) for i, p in enumerate(prompts)]
    queued = 0
    while engine.has_unfinished():
        engine.step()
        queued += bool(engine._queued)
    assert engine.kv.available_pages() == engine.kv.total_pages
    return [r.output_ids for r in reqs], queued


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("sampling", ["greedy", "seeded", "penalised"])
def test_overlapped_tokens_equal_stepwise(engines, batch: int, sampling: str) -> None:  # noqa: ANN001
    """Batch 1 (the ids a view of the sampler's output), 5 (static pieces: per-row copies) and 16; greedy and seeded
    top-p sampling (the uniforms uploaded through page-locked staging every step), and with penalties (their lists
    uploaded the same way, built after the previous token is read); requests of unequal lengths."""
    from vptq_mlc.runtime import SamplingParams

    overlapped, stepwise = engines
    assert overlapped.overlap and not stepwise.overlap

    def params(i: int) -> SamplingParams:
        n = 10 + 3 * (i % 4)
        if sampling == "greedy":
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        if sampling == "penalised":  # the penalty lists must hold the token read just before the sampling
            return SamplingParams(max_tokens=n, temperature=0.9, seed=100 + i, repetition_penalty=1.3,
                                  presence_penalty=0.5, ignore_eos=True)
        return SamplingParams(max_tokens=n, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True)

    prompts = _prompts(batch)
    got, queued = _run(overlapped, prompts, params)
    want, none = _run(stepwise, prompts, params)
    assert queued >= 8 and none == 0
    assert got == want


def test_page_locked_read_and_upload_match_synchronous_copies(engines) -> None:  # noqa: ANN001
    import tvm

    from vptq_mlc.runtime.async_copy import HostLink

    dev = tvm.cuda(0)
    link = HostLink(dev)
    assert link.asynchronous
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((7, 21)).astype(np.float32) for _ in range(8)]
    dst = tvm.runtime.empty((7, 21), "float32", dev)
    reads = []
    for h in host:  # more uploads and reads than staging buffers: each reuse waits for its fence
        link.upload(dst, h)
        reads.append((link.read([dst]), h))
        if len(reads) == 2:
            pending, want = reads.pop(0)
            np.testing.assert_array_equal(pending.wait()[0], want)
    pending, want = reads.pop(0)
    np.testing.assert_array_equal(pending.wait()[0], want)
    np.testing.assert_array_equal(dst.numpy(), host[-1])
