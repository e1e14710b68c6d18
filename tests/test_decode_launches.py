"""Kernel launches of a CUDA decode step, per decoder layer, counted in the lowered relax module (no GPU, no nvcc).

Why: at batch 1 a 7B decode step is bound by kernel count as much as by bytes (about 2-3 us per launch on an H100
graph replay); linears that read the same activation share their launches (q/k/v: one prologue + one GEMV,
gate/up: the same), which nothing else would notice going away. The expected families per layer are written out
from the Llama block: 2 RMSNorms, the shared prologue + shared GEMV for q/k/v and for gate/up, o_proj and down_proj
with their own prologue + GEMV, the qkv concat (with the three dot adds), the residual adds, silu * up.
About 15 s on 2 cores (relax pipeline only).
"""

from __future__ import annotations

from collections import Counter

import pytest
from test_cuda_aot import require_cuda_toolkit

from vptq_mlc.bench.launches import launches, launches_per_layer, lowered_module


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    require_cuda_toolkit(cuobjdump=False)  # the CUDA backend's preparation (no nvcc run)
    tmp = tmp_path_factory.mktemp("launches")
    # q, k and v of one shape (num_kv_heads = num_heads), so all three share the GEMV launch too
    ckpt = make_synthetic_checkpoint(tmp / "ckpt", variant="v8-k256-256", hidden_size=64, intermediate_size=128,
                                     num_layers=3, num_heads=4, num_kv_heads=4, vocab_size=320)
    return lowered_module(convert_checkpoint(ckpt, tmp / "mlc", dtype="float16"))[0]


def _families(calls: list[tuple[str, int]]) -> Counter:
    attn = [i for i, (n, _) in enumerate(calls) if "attention" in n]
    return Counter(n.rstrip("0123456789_") for n, k in calls[attn[0]:attn[1]] if k)


def test_decode_layer_launches_are_shared(lowered) -> None:
    """Each normed linear's prologue runs inside its GEMV (one launch per linear, none for the prologue or the
    norm-bias add); q/k/v share one launch, gate/up another."""
    calls = launches(lowered, "decode")
    assert launches_per_layer(calls) == [10, 10]
    fam = _families(calls)
    assert fam["vq_matmul_fused"] == 4  # q/k/v, o_proj, gate/up, down_proj
    assert "vq_prologue" not in fam and "vq_prologue_shared" not in fam and "vq_matmul_shared" not in fam
    assert fam["rms_norm"] == 2
    assert sum(fam.values()) == 10
    shared = [name for name, k in calls if name.startswith("vq_matmul_fused")]
    fused = {name: lowered[name] for name in shared}
    # q/k/v: 3 layers' x, col_scale, weight_bias, ... in one launch: one x and three y
    assert sorted(len([p for p in f.params if p.name.startswith("y_")]) for f in fused.values()) == [1, 1, 2, 3]


def test_prefill_shares_the_prologue_only(lowered) -> None:
    """Symbolic rows get the prefill kernel per layer (no multi-layer form), the prologue is still shared."""
    fam = _families(launches(lowered, "prefill"))
    assert fam["vq_prologue_shared"] == 2 and fam["vq_prologue"] == 2
    assert "vq_matmul_shared" not in fam and fam["vq_matmul"] == 7
