"""GPU: every CUDA VQ kernel vs the dense-dequant reference, and greedy text of the CUDA library vs the CPU one.

Runs on a CUDA host only (skipped elsewhere) with artifacts built on the build box:
- VPTQ_MLC_GPU_KERNELS: a folder from `vptq-mlc bench build DIR --suite check` (kernels_cuda.so + kernels.json);
- VPTQ_MLC_GPU_E2E: a folder with `model/` (converted), `model-cpu.so` and `model-cuda.so`.
Works with the runtime-only TVM bundle (no compiler on the GPU host); torch is the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNELS = os.environ.get("VPTQ_MLC_GPU_KERNELS")
E2E = os.environ.get("VPTQ_MLC_GPU_E2E")


@pytest.mark.skipif(not KERNELS, reason="set VPTQ_MLC_GPU_KERNELS to a `bench build --suite check` folder")
def test_every_kernel_matches_dense_dequant():
    from vptq_mlc.bench.kernels import check_kernels

    res = check_kernels(KERNELS)
    bad = [(r["case"], r["rel_err"]) for r in res if not r["ok"]]
    assert not bad, bad
    assert len(res) >= 40


@pytest.mark.skipif(not E2E, reason="set VPTQ_MLC_GPU_E2E to a folder with model/, model-cpu.so, model-cuda.so")
def test_cuda_greedy_tokens_equal_cpu_library():
    from vptq_mlc.bench.e2e import greedy_decode

    d = Path(E2E)
    prompt = list(range(1, 17))
    gpu = greedy_decode(d / "model", d / "model-cuda.so", "cuda", prompt, 32)
    cpu = greedy_decode(d / "model", d / "model-cpu.so", "cpu", prompt, 32)
    assert gpu.tokens == cpu.tokens


@pytest.mark.skipif(not E2E, reason="set VPTQ_MLC_GPU_E2E")
def test_cuda_engine_batch_decode_equals_cpu_engine():
    """Engine uses batch_prefill/batch_decode (the symbolic-batch kernels): same greedy text as on CPU."""
    from vptq_mlc.runtime.engine import Engine

    d = Path(E2E)
    outs = []
    for lib, dev in ((d / "model-cuda.so", "cuda"), (d / "model-cpu.so", "cpu")):
        eng = Engine(d / "model", lib, device=dev)
        outs.append(eng.generate(list(range(1, 17)), max_tokens=32, temperature=0.0))
    assert outs[0] == outs[1]


@pytest.mark.skipif(not E2E or not (Path(E2E or ".") / "ckpt").is_dir(), reason="set VPTQ_MLC_GPU_E2E with ckpt/")
def test_cuda_library_matches_transformers_dense_reference():
    """All 32 greedy tokens of the CUDA library (fp16) vs transformers in float32 on the dense dequantized weights
    (tests/reference_model.py: safetensors + reference dequant, nothing of vptq_mlc), teacher-forced: the reference
    reads prompt + our tokens in one pass, and at every position (a) its logits are within LOGIT_TOL of the largest
    reference logit of ours and (b) its argmax is our token, unless its own top-2 margin is within twice our
    difference there (a near-tie that fp16 rounding may legitimately flip)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import numpy as np
    from reference_model import reference_model

    from vptq_mlc.bench.e2e import greedy_decode

    LOGIT_TOL = 2e-2  # fraction of the largest |reference logit|; the CUDA-vs-CPU engine test uses the same bound
    d = Path(E2E)
    prompt, steps = list(range(1, 17)), 32
    ours = greedy_decode(d / "model", d / "model-cuda.so", "cuda", prompt, steps, keep_logits=True)
    got = np.stack(ours.logits)  # [steps, vocab]: row t chose ours.tokens[t]
    assert got.shape[0] == len(ours.tokens) == steps
    model = reference_model(d / "ckpt").to("cuda", torch.float32)
    ids = torch.tensor([prompt + ours.tokens[:-1]], device="cuda")
    with torch.no_grad():
        ref = model(ids).logits[0, len(prompt) - 1:].double().cpu().numpy()  # [steps, vocab]
    ref = ref[:, : got.shape[1]]
    scale = float(np.abs(ref).max())
    diff = np.abs(got - ref).max(-1)  # [steps]
    print(f"max logit difference {diff.max():.3g} (scale {scale:.3g}); tokens {ours.tokens}")
    assert float(diff.max()) <= LOGIT_TOL * scale, f"logits differ by {diff.max():.3g} (scale {scale:.3g})"
    top2 = np.sort(ref, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    flips = (ref.argmax(-1) != np.asarray(ours.tokens)) & (margin > 2 * diff)
    assert not flips.any(), f"our token differs from the reference's away from near-ties at steps {np.where(flips)[0]}"
