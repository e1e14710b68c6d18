"""GPU: the tiny fp16 DeepSeek-V3 on TVM's latent (MLA) KV cache, on CUDA, against transformers.

`compile --target cuda` builds deepseek_v3 on the MLA cache by default (`--kv-cache auto`, `compile/build.py:
LATENT_BY_DEFAULT`; `--kv-cache mha` for the decompressed cache): each token's latent (kv_lora_rank +
qk_rope_head_dim wide) is cached, decode attends over the pages with the absorbed query (q_nope @ W_UK) and
multiplies the latent output by W_UV, prefill adds the chunk's own tokens with decompressed K/V and merges the two
parts (model/deepseek_v3.py).
TVM has no CPU kernels for that cache, so only a GPU runs it.

`bash bench/gpu_artifacts.sh ART e2emla` builds, per shape (`tiny`: the e2eds checkpoint's widths, 8 + 32 latent;
`r1widths`: DeepSeek-R1's per-head widths, a 576-wide latent), model/, reference.npz (transformers' greedy tokens and
teacher-forced logits, computed on the build box) and gzipped libraries that bench/gpu_suite.sh unpacks:
model-mla.so (the MLA cache) and model-cuda.so (`--kv-cache mha`, the decompressed cache: a control, so that a
failure of the MLA library alone is the MLA path's). The checks are tests/deepseek_e2e.py's `check_library`
(teacher-forced logits within 2e-2 of the logit scale alone, 4 and 16 rows batched; argmax and the Engine's greedy
tokens equal to transformers' away from near-ties, alone and batched) plus `check_chunked_and_prefix` (the Engine
with a 16-token prefill chunk: the 41-token prompt in three chunks, each prompt again reusing its cached prefix
where it spans a page, all together). Runs with the runtime-only TVM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deepseek_e2e import check_library

FOLDER = os.environ.get("VPTQ_MLC_GPU_DEEPSEEK_MLA")
pytestmark = pytest.mark.skipif(not FOLDER, reason="set VPTQ_MLC_GPU_DEEPSEEK_MLA to the e2emla folder of "
                                "bench/gpu_artifacts.sh (tiny/ and r1widths/: model/, model-*.so, reference.npz)")


@pytest.mark.parametrize("shape", ["tiny", "r1widths"])
@pytest.mark.parametrize("lib_name", ["model-mla.so", "model-cuda.so"])
def test_deepseek_mla_cache_matches_transformers(shape: str, lib_name: str) -> None:
    from vptq_mlc.runtime.device import resolve_device
    from vptq_mlc.runtime.library import load_library

    try:
        resolve_device("cuda")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no CUDA device: {e}")
    folder = Path(FOLDER) / shape
    kind = load_library(folder / lib_name, "cuda").metadata["kv_cache"]["attn_kind"]
    assert kind == ("mla" if lib_name == "model-mla.so" else "mha")
    worst = check_library(folder, lib_name, "cuda", chunked=True)
    print(f"\n{shape} {lib_name} ({kind} cache) on cuda: {worst}")
