"""GPU: our split-KV decode attention (VPTQ_MLC_DECODE_ATTN, with its split-bound variants) and TVM's decode kernel
against a float64 numpy reference on scattered pages: batch 1 and 16 at contexts 128 and 2,048, 8,192 tokens,
ragged batches down to one key; 32/32, 8/32 and 4/32 heads of 128 (bench/attention_decode.py: every (sequence,
head) row's relative L2 error <= 2e-3, log2-sum-exp within 2e-3).
Needs a CUDA GPU, torch, and VPTQ_MLC_GPU_DATTN: the folder `python3 bench/attention_decode.py build` wrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATTN = os.environ.get("VPTQ_MLC_GPU_DATTN")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(not DATTN, reason="set VPTQ_MLC_GPU_DATTN to the folder of `bench/attention_decode.py build`")
def test_split_kv_decode_matches_the_reference_and_tvms_kernel(tmp_path):
    assert Path(DATTN).is_dir(), f"VPTQ_MLC_GPU_DATTN={DATTN} is not a folder"
    from vptq_mlc.bench.script import load_script

    bench = load_script(Path(__file__).resolve().parents[2] / "bench" / "attention_decode.py")
    assert bench.run(Path(DATTN), tmp_path / "attention_decode.json", reps=3) == 0
