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


def first_divergence_is_a_near_tie(ours: list[int], ref: list[int], ours_rows, ref_rows) -> tuple[int, str]:
    """(steps compared, message): equal token lists, or a first difference at a step where both runs saw the same
    history and the reference's own top-2 margin is within twice the two runs' logit difference there (a near-tie
    that fp16 rounding may legitimately flip; after it the histories differ, so nothing later is compared)."""
    import numpy as np

    n = next((t for t, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if n is None:
        return len(ref), ""
    got, want = np.asarray(ours_rows[n], dtype=np.float64), np.asarray(ref_rows[n], dtype=np.float64)
    both = (got > -1e29) & (want > -1e29)  # rows may list only some tokens (the others -1e30)
    top2 = np.sort(want)[-2:]
    margin, diff = float(top2[1] - top2[0]), float(np.abs(got[both] - want[both]).max())
    scale = float(np.abs(want[both]).max())
    assert diff <= 2e-2 * scale, f"step {n}: logits differ by {diff:.3g} (scale {scale:.3g}), over 2e-2 of it"
    assert margin <= 2 * diff, (f"step {n}: token {ours[n]} vs {ref[n]} with a reference top-2 margin {margin:.3g} "
                                f"above twice the logit difference {diff:.3g}: not a near-tie")
    return n, f"first difference at step {n}: a near-tie (margin {margin:.3g}, logit difference {diff:.3g})"


@pytest.mark.skipif(not E2E, reason="set VPTQ_MLC_GPU_E2E to a folder with model/, model-cpu.so, model-cuda.so")
def test_cuda_greedy_tokens_equal_cpu_library():
    """32 greedy tokens of the CUDA library vs the CPU library: equal, or equal up to a near-tie."""
    from vptq_mlc.bench.e2e import greedy_decode

    d = Path(E2E)
    prompt = list(range(1, 17))
    gpu = greedy_decode(d / "model", d / "model-cuda.so", "cuda", prompt, 32, keep_logits=True)
    cpu = greedy_decode(d / "model", d / "model-cpu.so", "cpu", prompt, 32, keep_logits=True)
    n, why = first_divergence_is_a_near_tie(gpu.tokens, cpu.tokens, gpu.logits, cpu.logits)
    print(f"{n} of 32 tokens equal; {why}")


@pytest.mark.skipif(not E2E, reason="set VPTQ_MLC_GPU_E2E")
def test_cuda_engine_batch_decode_equals_cpu_engine():
    """Engine with three requests at once (batch_prefill, a static batch_decode_b3 and the compiled sampler on
    CUDA): each request's greedy tokens equal the CPU engine's, or equal up to a near-tie. The rows behind the
    tokens are the top-2 logprobs each engine reports (at temperature 0 they differ from logits by one constant per
    row, so margins and differences are the logits')."""
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.sampling import SamplingParams

    d = Path(E2E)
    prompts = [list(range(1, 17)), list(range(40, 47)), list(range(3, 60, 2))]
    runs = []
    for lib, dev in ((d / "model-cuda.so", "cuda"), (d / "model-cpu.so", "cpu")):
        eng = Engine(d / "model", lib, device=dev, max_batch_size=4)
        reqs = [eng.add_request(p, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=True,
                                                  top_logprobs=2)) for p in prompts]
        while eng.has_unfinished():
            eng.step()
        runs.append(reqs)
    for gpu, cpu in zip(*runs):
        vocab = max(max(t for t, _ in lp.top) for r in (gpu, cpu) for lp in r.output_logprobs) + 1

        def rows(req, vocab=vocab):  # top-2 logprobs as rows (-inf elsewhere): enough for margin and difference
            import numpy as np

            out = np.full((len(req.output_logprobs), vocab), -1e30)
            for i, lp in enumerate(req.output_logprobs):
                for t, v in lp.top:
                    out[i, t] = v
            return out

        assert len(gpu.output_ids) == len(cpu.output_ids) == 32
        n, why = first_divergence_is_a_near_tie(gpu.output_ids, cpu.output_ids, rows(gpu), rows(cpu))
        print(f"request {gpu.prompt_ids[:3]}...: {n} of 32 tokens equal; {why}")


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
