"""GPU: the gathered-experts kernel (tir_kernels/cuda_gather.py) at DeepSeek-R1's expert shapes against the stacked
layout's definition in torch (tests/gathered_kernels.py), with its time per call; artifacts from
`bash bench/gpu_artifacts.sh ART kgather` (`VPTQ_MLC_GPU_GATHER` = ART/kgather, set by bench/gpu_suite.sh's pytest
step). Runs with the runtime-only TVM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
FOLDER = os.environ.get("VPTQ_MLC_GPU_GATHER")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not FOLDER, reason="set VPTQ_MLC_GPU_GATHER to the kgather folder of "
                                 "bench/gpu_artifacts.sh")]


def test_gathered_kernel_matches_the_layout_definition():
    from gathered_kernels import check

    res = check(Path(FOLDER))
    for r in res:
        print(json.dumps(r))
    bad = [(r["case"], r["rows"], r["rel_err"], r["nan"]) for r in res if not r["ok"]]
    assert not bad, bad
    assert len(res) >= 10
