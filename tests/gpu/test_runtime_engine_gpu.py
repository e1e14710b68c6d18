"""GPU: the runtime Engine on a CUDA library: same greedy tokens as the CPU library, batching == alone,
chunked prefill == unchunked, KV pages back after finishing, seeded sampling reproducible.

Uses the VPTQ_MLC_GPU_E2E folder of tests/gpu/test_cuda_kernels.py (`model/`, `model-cpu.so`,
`model-cuda.so`); runs with the runtime-only TVM bundle (no compiler on the GPU host).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

E2E = os.environ.get("VPTQ_MLC_GPU_E2E")
pytestmark = pytest.mark.skipif(not E2E, reason="set VPTQ_MLC_GPU_E2E to a folder with model/, model-cpu.so, model-cuda.so")

PROMPTS = [[5, 9, 13, 200, 31, 7], list(range(20, 61)), [42]]


def _greedy(n: int = 12):  # noqa: ANN202
    from vptq_mlc.runtime import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _alone(engine, prompt, params) -> list[int]:  # noqa: ANN001
    req = engine.add_request(prompt, params)
    while not req.finished:
        engine.step()
    return req.output_ids


@pytest.fixture(scope="module")
def engines():  # noqa: ANN201
    from vptq_mlc.runtime import Engine
    from vptq_mlc.runtime.device import resolve_device

    try:
        resolve_device("cuda")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CUDA device: {e}")
    d = Path(E2E)
    return Engine(d / "model", d / "model-cpu.so", device="cpu"), Engine(d / "model", d / "model-cuda.so", device="cuda")


def test_cuda_engine_matches_cpu_and_batches(engines) -> None:  # noqa: ANN001
    cpu, gpu = engines
    solo = [_alone(gpu, p, _greedy()) for p in PROMPTS]
    assert solo == [_alone(cpu, p, _greedy()) for p in PROMPTS]
    reqs = [gpu.add_request(p, _greedy()) for p in PROMPTS]
    gpu.step()
    assert gpu.kv.available_pages() < gpu.kv.total_pages
    while gpu.has_unfinished():
        gpu.step()
    assert [r.output_ids for r in reqs] == solo
    assert gpu.kv.available_pages() == gpu.kv.total_pages


def test_cuda_chunked_prefill_and_seed(engines) -> None:  # noqa: ANN001
    from vptq_mlc.runtime import Engine, SamplingParams

    _, gpu = engines
    chunked = Engine(gpu.model_dir, gpu.lib.path, device="cuda", prefill_chunk_size=7)
    assert _alone(chunked, PROMPTS[1], _greedy()) == _alone(gpu, PROMPTS[1], _greedy())
    sampled = [_alone(gpu, PROMPTS[0], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=4,
                                                      ignore_eos=True)) for _ in range(2)]
    assert sampled[0] == sampled[1]
