"""GPU: the code-sorted decode kernel (K = 65536 class codebooks, rows 1..2) vs a torch dense-dequant reference.

Runs on a CUDA host only (skipped elsewhere) with a folder from `vptq-mlc bench build DIR --suite code-sorted`
(built on the build box) in VPTQ_MLC_GPU_CODE_SORTED. Each kernel's operands are written by the converter's layout
code from a random layer; the reference is `x @ dequantize(W).T + bias` (checkpoint/dequant.py, the spec) in float64.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ART = os.environ.get("VPTQ_MLC_GPU_CODE_SORTED")


@pytest.mark.skipif(not ART, reason="set VPTQ_MLC_GPU_CODE_SORTED to a `bench build --suite code-sorted` folder")
def test_code_sorted_kernels_match_dense_dequant():
    from vptq_mlc.bench.kernels import ROW_REL_ERR_MAX, check_kernels, load_manifest

    manifest, cases = load_manifest(ART)
    code_sorted = [i for i, call in enumerate(manifest["calls"]) if call and "cs_entries" in call["operands"]]
    assert len(code_sorted) >= 30  # every small case + the real shapes at rows 1 and 2 + the sweep
    small = {cases[i].name for i in code_sorted if cases[i].in_features * cases[i].out_features <= 1 << 21}
    res = check_kernels(ART, max_weights=1 << 21)  # real shapes: checked against torch by `bench kernels`
    bad = [(r["case"], r["rel_err"]) for r in res if not r["ok"]]
    assert not bad, bad
    checked = [r for r in res if r["case"] in small]
    assert len(checked) >= 15
    worst = max(r["rel_err"] for r in checked)
    print(f"{len(checked)} code-sorted kernels checked, worst per-row relative L2 error {worst:.2e}")
    assert worst <= ROW_REL_ERR_MAX  # fp16 operands, fp32 accumulation
