"""GPU: the tiny fp16 DeepSeek-V3 (MLA on the MHA paged cache, MoE) on CUDA against transformers.

The routed experts run gathered: `convert` stacks each MoE layer's experts (artifact/expert_stack.py) and the CUDA
library's only path to them is tir_kernels/cuda_gather.py (one launch for every token's selected gate/up GEMVs, one
for down; prefill and every decode batch alike); `check_library` first asserts the library declares the stacked
tensors and no per-expert ones, so every check below runs that kernel.

The GPU host has no transformers, so transformers' greedy tokens and teacher-forced logits come from the build box
(`bash bench/gpu_artifacts.sh ART e2eds` writes ART/e2eds/reference.npz next to model/ and the gzipped libraries,
which bench/gpu_suite.sh unpacks to model-cpu.so and model-cuda.so). Checks and bound (2e-2 of the logit scale,
the one tests/gpu/test_runtime_engine_gpu.py uses for the tiny fp16 Llama) are in tests/deepseek_e2e.py:
teacher-forced logits of each prompt alone (`prefill`, then `decode`: the one-row GEMV), of four together
(`batch_decode_b4`: the GEMV at 4 rows) and of 16 rows (`batch_decode_b16`: the tensor-core decode kernel), argmax
equal away from near-ties, and the runtime Engine's greedy tokens, alone and batched, equal to transformers' up to
the first near-tie. The llvm library runs the same checks on the host's CPU as a control (a CUDA-only failure is
then the CUDA path's). Runs with the runtime-only TVM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deepseek_e2e import check_library

FOLDER = os.environ.get("VPTQ_MLC_GPU_DEEPSEEK")
pytestmark = pytest.mark.skipif(not FOLDER, reason="set VPTQ_MLC_GPU_DEEPSEEK to the e2eds folder of "
                                "bench/gpu_artifacts.sh (model/, model-cpu.so, model-cuda.so, reference.npz)")


@pytest.mark.parametrize("lib_name, device", [("model-cuda.so", "cuda"), ("model-cpu.so", "cpu")])
def test_deepseek_matches_transformers(lib_name: str, device: str) -> None:
    if device == "cuda":
        from vptq_mlc.runtime.device import resolve_device

        try:
            resolve_device("cuda")
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"no CUDA device: {e}")
    worst = check_library(Path(FOLDER), lib_name, device)
    print(f"\n{lib_name} on {device}: {worst}")
