"""Kernel launches of a CUDA decode step, per decoder layer, counted in the lowered relax module (no GPU, no nvcc).

Why: at batch 1 a 7B decode step is bound by kernel count as much as by bytes (about 2-3 us per launch on an H100
graph replay); at decode row counts the Llama block's kernels fold into its four GEMVs (the prologues, the RMSNorms,
the q/k/v concat, silu * up, the residual adds: docs/ARCHITECTURE.md), which nothing else would notice going away.
About 15 s on 2 cores (relax pipeline only).
"""

from __future__ import annotations

from collections import Counter

import pytest
from test_cuda_aot import require_cuda_toolkit

from vptq_mlc.bench.launches import launches, launches_per_layer, lowered_module
from vptq_mlc.tir_kernels.registry import FUSED_DECODE_ENV, TWO_LAUNCH_DECODE_ENV, TWO_LAUNCH_MMA_ENV


def _lower(tmp, monkeypatch, fused: str, two_launch: str = "0", two_launch_mma: str = "",
           batches: tuple[int, ...] = ()):
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    require_cuda_toolkit(cuobjdump=False)  # the CUDA backend's preparation (no nvcc run)
    # q, k and v of one shape (num_kv_heads = num_heads), so all three share the GEMV launch too
    ckpt = make_synthetic_checkpoint(tmp / "ckpt", variant="v8-k256-256", hidden_size=64, intermediate_size=128,
                                     num_layers=3, num_heads=4, num_kv_heads=4, vocab_size=320)
    monkeypatch.setenv(FUSED_DECODE_ENV, fused)
    monkeypatch.setenv(TWO_LAUNCH_DECODE_ENV, two_launch)
    monkeypatch.setenv(TWO_LAUNCH_MMA_ENV, two_launch_mma)
    return lowered_module(convert_checkpoint(ckpt, tmp / "mlc", dtype="float16"), static_decode_batches=batches)[0]


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """Both fused forms off: the shared prologue + GEMV launches, the neighbours as their own kernels."""
    with pytest.MonkeyPatch.context() as mp:
        return _lower(tmp_path_factory.mktemp("launches"), mp, "0")


@pytest.fixture(scope="module")
def lowered_fused(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return _lower(tmp_path_factory.mktemp("launches_fused"), mp, "1")


def _families(calls: list[tuple[str, int]]) -> Counter:
    attn = [i for i, (n, _) in enumerate(calls) if "attention" in n]
    return Counter(n.rstrip("0123456789_") for n, k in calls[attn[0]:attn[1]] if k)


def _fused_calls(mod, per_layer: list[int], function: str = "decode") -> list:
    """The decode's fused calls, after checking the launches per layer and that they are the only VQ calls."""
    calls = launches(mod, function)
    assert launches_per_layer(calls) == per_layer
    assert _families(calls) == {"vq_matmul_fused": 4}
    return [mod[name] for name, k in calls if name.startswith("vq_matmul_fused")]


def _count_params(f, prefix: str) -> int:
    return sum(p.name.startswith(prefix) for p in f.params)


def test_decode_layer_launches_are_shared(lowered) -> None:
    """Both fused forms off: q/k/v and gate/up share one prologue and one GEMV launch each."""
    calls = launches(lowered, "decode")
    assert launches_per_layer(calls) == [14, 14]
    fam = _families(calls)
    assert fam["vq_prologue_shared"] == 2 and fam["vq_matmul_shared"] == 2  # q/k/v and gate/up
    assert fam["vq_prologue"] == 2 and fam["vq_matmul"] == 2  # o_proj and down_proj
    assert fam["rms_norm"] == 2
    assert sum(fam.values()) == 14


def test_decode_layer_launches_are_fused(lowered_fused) -> None:
    """Each normed linear's prologue runs inside its GEMV, and so do its neighbours: the layer's RMSNorms (q/k/v,
    gate/up), the q/k/v concat, silu(gate) * up (down_proj) and the residual adds (o_proj, down_proj): four launches
    per decoder layer besides the KV cache's own (FUSED_DECODE_ENV=1)."""
    fused = _fused_calls(lowered_fused, [4, 4])
    params = _count_params
    # per layer: q/k/v (RMSNorm, one output), o_proj (residual), gate/up (RMSNorm, two outputs), down (swiglu)
    assert [(params(f, "y_"), params(f, "gamma"), params(f, "residual"), params(f, "x2")) for f in fused[:4]] == [
        (1, 1, 0, 0), (1, 0, 1, 0), (2, 1, 0, 0), (1, 0, 1, 1)]
    assert params(fused[0], "codes_") == 3


def test_prefill_shares_the_prologue_only(lowered_two_launch) -> None:
    """Symbolic rows (the default build) get the folded prefill: q/k/v and gate/up one folded group call each, o and
    down one folded call each; the (gated) prologue is still shared."""
    fam = _families(launches(lowered_two_launch, "prefill"))
    assert fam["vq_prologue_shared"] == 2 and fam["vq_prologue"] == 2
    assert "vq_matmul_shared" not in fam and fam["vq_matmul_folded_group"] == 2 and fam["vq_matmul_folded"] == 2


def test_fused_decode_switch_takes_only_0_or_1(monkeypatch) -> None:
    from vptq_mlc.errors import CompileError
    from vptq_mlc.tir_kernels.registry import fused_decode_enabled

    monkeypatch.setenv(FUSED_DECODE_ENV, "yes")
    with pytest.raises(CompileError, match=f"{FUSED_DECODE_ENV}='yes': set it to 1"):
        fused_decode_enabled()
    monkeypatch.setenv(FUSED_DECODE_ENV, "0")
    assert fused_decode_enabled() is False


@pytest.fixture(scope="module")
def lowered_two_launch(tmp_path_factory):
    """The default build (both switches unset)."""
    with pytest.MonkeyPatch.context() as mp:
        return _lower(tmp_path_factory.mktemp("launches_two"), mp, "", "")


def test_decode_layer_launches_in_two_launch_form(lowered_two_launch) -> None:
    """The default (VPTQ_MLC_TWO_LAUNCH_DECODE on): each normed linear group is one call of two kernels (prologue
    with its neighbour, GEMV with the dot / residual / q/k/v side by side): eight launches per decoder layer, no
    RMSNorm, concat, silu or add kernels; the prologue's xs and dot are scratch outputs of the call."""
    fused = _fused_calls(lowered_two_launch, [8, 8])
    params = _count_params
    assert [(params(f, "y_"), params(f, "gamma"), params(f, "residual"), params(f, "x2"), params(f, "xs_"))
            for f in fused[:4]] == [(1, 1, 0, 0, 3), (1, 0, 1, 0, 1), (2, 1, 0, 0, 2), (1, 0, 1, 1, 1)]


@pytest.fixture(scope="module")
def lowered_mma(tmp_path_factory):
    """The default build with a static 16-row decode (`batch_decode_b16`: v8-k256-256 runs the tensor-core kernel
    from 9 rows), and the same with VPTQ_MLC_TWO_LAUNCH_MMA=0."""
    out = {}
    for switch in ("", "0"):
        with pytest.MonkeyPatch.context() as mp:
            out[switch] = _lower(tmp_path_factory.mktemp(f"launches_mma{switch}"), mp, "", "", switch, (16,))
    return out


def test_tensor_core_rows_in_two_launch_form(lowered_mma) -> None:
    """At the tensor-core rows the default (VPTQ_MLC_TWO_LAUNCH_MMA on) is the two-launch form too: each normed
    linear is one call of the prologue kernel (with the RMSNorm / silu * up) and the whole-entry tensor-core kernel
    (adding the dot and residual). This model's layers are too narrow for the register-fragment launch of several
    layers, so each linear has its own call and q/k/v one concatenation: 15 launches per decoder layer, none of
    them an RMSNorm, silu * up or add. Switched off, those are kernels of their own again."""
    calls = launches(lowered_mma[""], "batch_decode_b16")
    assert launches_per_layer(calls) == [15, 15]
    fam = _families(calls)
    concat = [n for n in fam if "concatenate" in n]
    assert fam["vq_matmul_fused"] == 7 and len(concat) == 1 and fam[concat[0]] == 1 and sum(fam.values()) == 8
    fused = [lowered_mma[""][name] for name, k in calls if name.startswith("vq_matmul_fused")]
    params = _count_params
    # per layer: q, k, v (RMSNorm), o_proj (residual), gate, up (RMSNorm), down (silu * up, residual)
    assert [(params(f, "gamma"), params(f, "residual"), params(f, "x2")) for f in fused[:7]] == [
        (1, 0, 0)] * 3 + [(0, 1, 0)] + [(1, 0, 0)] * 2 + [(0, 1, 1)]
    assert all("ptx_legacy.mma" in f.script() for f in fused)  # the tensor-core kernel, not the GEMV
    off = launches(lowered_mma["0"], "batch_decode_b16")
    fam = _families(off)
    assert "vq_matmul_fused" not in fam and fam["rms_norm"] == 2
    assert launches_per_layer(off)[0] > 8
