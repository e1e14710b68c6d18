"""GPU: our paged prefill attention (split over the cached length for short chunks) and TVM's kernel against a
float64 numpy reference on scattered pages: short chunks over 1,024-4,096 cached tokens, decode-sized rows, mixed
batches with an empty cache, causal and not, chunks too long to split; grouped and plain heads
(bench/attention_prefill.py: every (token, head) row's relative L2 error <= 2e-3, log2-sum-exp within 2e-3).
Needs a CUDA GPU, torch, and VPTQ_MLC_GPU_ATTN: the folder `python3 bench/attention_prefill.py build` wrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ATTN = os.environ.get("VPTQ_MLC_GPU_ATTN")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(not ATTN, reason="set VPTQ_MLC_GPU_ATTN to the folder of `bench/attention_prefill.py build`")
def test_split_kv_prefill_matches_the_reference_and_tvms_kernel(tmp_path):
    assert Path(ATTN).is_dir(), f"VPTQ_MLC_GPU_ATTN={ATTN} is not a folder"
    from vptq_mlc.bench.script import load_script

    bench = load_script(Path(__file__).resolve().parents[2] / "bench" / "attention_prefill.py")
    assert bench.run(Path(ATTN), tmp_path / "attention.json", reps=3) == 0
