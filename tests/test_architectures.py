"""Every architecture and every honoured HF config field against transformers' dense reference on CPU.

Each tiny checkpoint batches several fields (biases, head_dim, tied embeddings, a RoPE scaling, a sliding window,
the stored dtype) so that few llvm compiles cover them all: convert -> compile (llvm) -> teacher-forced logits of a
prefill and decode steps vs transformers holding the dense weights dequantized by the independent reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cpu_pipeline import build_llvm, run_requests
from library_logits import assert_logits_match_reference
from reference_model import reference_greedy, reference_model

from vptq_mlc.checkpoint.arch import ARCHITECTURES, decoder_config_from_hf
from vptq_mlc.compile.build import compile_model
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.errors import CheckpointError
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.testing.synthetic import hf_config_for, make_synthetic_checkpoint

PREFILL, DECODE = 20, 8
# name -> (arch, checkpoint dtype, make_synthetic_checkpoint kwargs, config.json overrides)
CASES = {
    "llama-bf16-biases-headdim-tied-yarn": (
        "llama", "bfloat16", {"head_dim": 32, "tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True, "max_position_embeddings": 256,
         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "llama-fp16-linear": (
        "llama", "float16", {"layer_kwargs": {"enable_norm": False}, "variant": "v8-k256-0"},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ),
    "qwen2-longrope-sliding": (
        "qwen2", "float32", {},
        {"max_position_embeddings": 256, "original_max_position_embeddings": 64,
         "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(8)],
                          "long_factor": [4.0] * 8},
         "use_sliding_window": True, "sliding_window": 48, "max_window_layers": 1},
    ),
    "mistral-llama3-sliding": (
        "mistral", "float32", {},
        {"sliding_window": 40,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}},
    ),
    # MLA with q LoRA, interleaved yarn RoPE with mscale_all_dim (softmax scale and cos/sin factor), 8 routed experts
    # in 2 groups (1 kept, 2 per token) + 1 shared, first layer dense
    "deepseek_v3-qlora-yarn-interleave": (
        "deepseek_v3", "float32", {"num_layers": 3},
        {"max_position_embeddings": 256,
         "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                          "mscale": 1.0, "mscale_all_dim": 0.7}},
    ),
    # one q_proj, v wider than q/k (the cache pads q and k), plain RoPE halves, biases, unnormalised routing, bf16
    "deepseek_v3-bf16-noqlora-vwide-bias": (
        "deepseek_v3", "bfloat16", {"num_layers": 2},
        {"q_lora_rank": None, "v_head_dim": 32, "rope_interleave": False, "attention_bias": True,
         "norm_topk_prob": False, "routed_scaling_factor": 1.5, "n_routed_experts": 6, "n_group": 3,
         "topk_group": 2, "num_experts_per_tok": 3},
    ),
    # routed experts of mixed configs (artifact/expert_stack.py): layer 1's gate differs from its up (gate and up
    # stacked apart), residual codebooks and outliers in the stacked up/down; one of layer 2's experts differs from
    # the others (layer 2 stays dense)
    "deepseek_v3-experts-mixed-configs": (
        "deepseek_v3", "float32",
        {"num_layers": 3, "path_layer_kwargs": {
            r"model\.layers\.[12]\.mlp\.experts\.\d+\.(up|down)_proj": {
                "variant": "v8-k64-16", "outlier_size": 8, "outlier_vector_len": 4, "num_outlier_centroids": 16,
                "group_num": 2},
            r"model\.layers\.1\.mlp\.experts\.\d+\.gate_proj": {"variant": "v4-k32-0"},
            r"model\.layers\.2\.mlp\.experts\.3\.down_proj": {"variant": "v4-k32-0"}}},
        {},
    ),
}
# the routed-expert stacks each deepseek case's library declares (artifact/expert_stack.py), by MoE layer
STACKED_EXPERTS = {
    "deepseek_v3-qlora-yarn-interleave": {1: ("gate_up_proj", "down_proj"), 2: ("gate_up_proj", "down_proj")},
    "deepseek_v3-bf16-noqlora-vwide-bias": {1: ("gate_up_proj", "down_proj")},
    "deepseek_v3-experts-mixed-configs": {1: ("gate_proj", "up_proj", "down_proj"), 2: ()},
}


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    arch, dtype, kw, overrides = CASES[request.param]
    return build_llvm(tmp_path_factory.mktemp(request.param), {"dtype": "float32"}, arch=arch, dtype=dtype, seed=3,
                      hf_overrides=overrides, **kw)


def test_routed_experts_run_gathered_where_they_stack(built, request):
    """The library declares each stack's tensors and no per-expert tensor of a stacked layer, so the logits checks
    above ran the gathered kernels there (the stacked names are the only way to the experts' weights); layers whose
    experts disagree keep per-expert tensors (the dense mixture)."""
    case = request.node.callspec.params["built"]
    if case not in STACKED_EXPERTS:
        pytest.skip("no mixture of experts")
    _, model_dir, lib_path = built
    from vptq_mlc.runtime.library import load_library

    names = {p["name"] for p in load_library(lib_path, "cpu").metadata["params"]}
    n_experts = json.loads((model_dir / "mlc-chat-config.json").read_text())["model_config"]["n_routed_experts"]
    for layer, stacks in STACKED_EXPERTS[case].items():
        prefix = f"model.layers.{layer}.mlp.experts"
        got = {n[len(prefix) + 1:].split(".")[0] for n in names if n.startswith(prefix + ".")}
        want = set(stacks) if stacks else {str(e) for e in range(n_experts)}
        assert got == want, f"layer {layer}: {sorted(got)}"


def test_logits_match_transformers(built):
    ckpt, model_dir, lib_path = built
    assert_logits_match_reference(ckpt, model_dir, lib_path, PREFILL, DECODE, seed=1)


def test_batched_greedy_matches_transformers(built):
    """Two prompts of different lengths decoded together (batch_prefill, batch_decode: per-sequence positions)."""
    ckpt, model_dir, lib_path = built
    engine = Engine(model_dir, lib_path, device="cpu")
    ref = reference_model(ckpt)
    prompts = [engine.tokenizer.encode(t, add_special_tokens=False) for t in ("The quick brown fox", "water light")]
    outputs = run_requests(engine, prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for p, out in zip(prompts, outputs):
        assert out == reference_greedy(ref, p, 10)


def test_context_caps_follow_the_config(built):
    """Sliding windows and longrope bound the context at which our math still equals transformers'."""
    ckpt, model_dir, _ = built
    hf = json.loads((ckpt / "config.json").read_text())
    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    want = int(hf.get("max_position_embeddings", 2048))
    if (hf.get("rope_scaling") or {}).get("rope_type") == "longrope":
        want = min(want, hf["original_max_position_embeddings"])
    if hf["model_type"] == "mistral" or hf.get("use_sliding_window"):
        want = min(want, hf["sliding_window"])
    assert chat["context_window_size"] == want


def _hf(arch: str, **overrides) -> dict:
    return hf_config_for(arch, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=None, vocab_size=512, tie_word_embeddings=False, dtype="float32",
                         overrides=overrides)


def test_llama_biases_follow_attention_bias_and_mlp_bias():
    arch = ARCHITECTURES["llama"]
    cfg = decoder_config_from_hf(_hf("llama", attention_bias=True))
    assert [s.leaf for s in arch.linears if s.bias(cfg)] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = decoder_config_from_hf(_hf("llama", mlp_bias=True))
    assert [s.leaf for s in arch.linears if s.bias(cfg)] == ["gate_proj", "up_proj", "down_proj"]
    cfg = decoder_config_from_hf(_hf("qwen2"))
    assert [s.leaf for s in arch.linears if s.bias(cfg)] == ["q_proj", "k_proj", "v_proj"]
    cfg = decoder_config_from_hf(_hf("mistral", attention_bias=True))  # transformers' Mistral ignores it
    assert not any(s.bias(cfg) for s in arch.linears)


def test_rope_inv_freq_matches_transformers():
    """Our numpy port of transformers' RoPE initialisers gives its inv_freq and attention factor."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for arch, extra in [
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                   "max_position_embeddings": 256}),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                    "beta_fast": 16, "beta_slow": 2, "truncate": False}}),
        ("llama", {"rope_scaling": {"type": "linear", "factor": 3.0}}),
        ("qwen2", {"max_position_embeddings": 256, "original_max_position_embeddings": 64,
                   "rope_scaling": {"rope_type": "longrope", "short_factor": [1.5] * 8, "long_factor": [2.0] * 8}}),
    ]:
        hf = _hf(arch, **extra)
        ours = decoder_config_from_hf(hf)
        config = AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "torch_dtype"})
        inv, factor = ROPE_INIT_FUNCTIONS[config.rope_scaling["rope_type"]](config, "cpu")
        np.testing.assert_allclose(ours.rope_inv_freq, inv.numpy(), rtol=1e-6)
        assert ours.rope_attention_factor == pytest.approx(factor, rel=1e-7)


def test_dynamic_rope_is_plain_rope_within_max_position_embeddings():
    cfg = decoder_config_from_hf(_hf("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert cfg.rope_inv_freq is None and cfg.rope_scaling is None and cfg.context_window_size == 2048
    with pytest.raises(CheckpointError, match="rope_scaling type 'dynamic'"):
        cfg.set_context_window(4096)


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", {"rope_type": "su", "factor": 2.0}, "rope_scaling type 'su' is not supported"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("rope_scaling", {"rope_type": "yarn"}, r"rope_scaling \(yarn\) lacks 'factor'"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
    ("head_dim", 15, "head_dim 15 is odd"),
])
def test_unsupported_fields_are_refused_by_name(field, value, match):
    with pytest.raises(CheckpointError, match=match):
        decoder_config_from_hf(_hf("llama", **{field: value}))


def test_sliding_window_past_the_context_changes_nothing():
    cfg = decoder_config_from_hf(_hf("mistral", sliding_window=4096, max_position_embeddings=2048))
    assert cfg.context_window_size == 2048
    cfg = decoder_config_from_hf(_hf("qwen2", sliding_window=32, use_sliding_window=False))
    assert cfg.context_window_size == 2048  # Qwen2 slides only with use_sliding_window


def test_docs_table_every_honoured_field():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    for arch in ARCHITECTURES.values():
        for name in arch.hf_fields:
            assert f"`{name}`" in doc, f"docs/architectures.md lacks {arch.name}'s field {name}"


def test_bias_disagreeing_with_attention_bias_is_one_line(tmp_path):
    """A llama checkpoint whose config says attention_bias but whose o_proj VPTQ layer has no bias is refused."""
    from vptq_mlc.checkpoint.reader import VPTQCheckpoint

    ckpt = make_synthetic_checkpoint(tmp_path / "ck", variant="v8-k256-0", num_layers=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["attention_bias"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="attention_bias/mlp_bias say q_proj has bias") as e:
        VPTQCheckpoint.open(ckpt).validate(progress=False)
    assert "\n" not in str(e.value)


def test_deepseek_v3_rope_and_softmax_scale_match_transformers():
    """RoPE on the qk_rope dims (transformers' head_dim = qk_rope_head_dim) and the MLA softmax scale with yarn's
    mscale_all_dim, as transformers' DeepseekV3 computes them; the config parses to transformers' shapes."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rs in ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
               {"type": "yarn", "factor": 8.0, "mscale": 0.8, "mscale_all_dim": 0.5},
               {"rope_type": "linear", "factor": 2.0}, None):
        hf = _hf("deepseek_v3", rope_scaling=rs, num_key_value_heads=4, max_position_embeddings=256)
        ours = decoder_config_from_hf(hf)
        config = transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k != "torch_dtype"})
        kind = (config.rope_scaling or {}).get("rope_type", "default")
        inv, factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
        np.testing.assert_allclose(ours.rope_inv_freq, inv.numpy(), rtol=1e-6)
        assert ours.rope_attention_factor == pytest.approx(factor, rel=1e-7)
        attn = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention(config, 0)
        assert ours.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)
        # the cache's head width: q/k and v fit, zero-padded to a multiple of 32 (TVM's CUDA decode attention needs
        # width / 4 threads x at most 64 in z for its 512-thread block: widths under 32 fail to launch)
        widest = max(config.qk_head_dim, config.v_head_dim)
        assert widest <= ours.head_dim < widest + 32 and ours.head_dim % 32 == 0 and ours.num_key_value_heads == 4
        assert 512 // (ours.head_dim // 4) <= 64


@pytest.mark.parametrize("overrides, match", [
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported"),
    ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    ({"num_key_value_heads": 2}, "needs num_key_value_heads == num_attention_heads"),
    ({"n_group": 3}, "must split into n_group 3 groups"),
    ({"n_group": 8}, "groups of at least 2 experts"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 must be between 1 and topk_group 1 x 4"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling type 'llama3' is not supported"),
    ({"n_shared_experts": 0}, "n_shared_experts < 1"),
])
def test_deepseek_v3_unsupported_fields_are_refused_by_name(overrides, match):
    hf = {**_hf("deepseek_v3"), "num_key_value_heads": 4, **overrides}
    with pytest.raises(CheckpointError, match=match) as e:
        decoder_config_from_hf(hf)
    assert "\n" not in str(e.value)


def test_deepseek_v3_linears_follow_the_config():
    """q LoRA or one q_proj, dense MLPs in the first_k_dense_replace layers, experts and a shared expert after."""
    from vptq_mlc.checkpoint.arch import decoder_linears, required_dense

    hf = _hf("deepseek_v3", num_key_value_heads=4, first_k_dense_replace=1)
    paths = set(decoder_linears(hf))
    assert "model.layers.0.mlp.gate_proj" in paths and "model.layers.0.mlp.experts.0.up_proj" not in paths
    assert {f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(8)} <= paths
    assert "model.layers.1.mlp.shared_experts.gate_proj" in paths and "model.layers.1.mlp.gate_proj" not in paths
    assert "model.layers.0.self_attn.q_a_proj" in paths and "model.layers.0.self_attn.q_proj" not in paths
    dense = required_dense(hf, paths)
    assert dense["model.layers.1.mlp.gate.weight"] == (8, 64) and "model.layers.0.mlp.gate.weight" not in dense
    assert dense["model.layers.0.self_attn.q_a_layernorm.weight"] == (32,)
    no_lora = _hf("deepseek_v3", num_key_value_heads=4, q_lora_rank=None)
    assert decoder_linears(no_lora)["model.layers.0.self_attn.q_proj"].out_features == 4 * 24
    assert "model.layers.0.self_attn.q_a_layernorm.weight" not in required_dense(no_lora, set())


def test_deepseek_v3_split_functions_are_refused(tmp_path):
    """The layer split knows the Llama layer only: compile says so in one line before any work."""
    from vptq_mlc.errors import CompileError

    ckpt = make_synthetic_checkpoint(tmp_path / "ck", arch="deepseek_v3", num_layers=2)
    model_dir = convert_checkpoint(ckpt, tmp_path / "mlc")
    with pytest.raises(CompileError, match="--split-functions is not supported for deepseek_v3") as e:
        compile_model(model_dir, "llvm", tmp_path / "lib.so", split_functions=True)
    assert "\n" not in str(e.value) and not (tmp_path / "lib.so").exists()


def test_deepseek_v3_router_bias_stays_float32_in_fp16_models(tmp_path):
    """The score-correction bias only picks experts, by small differences: an fp16 model keeps it float32."""
    from vptq_mlc.artifact.tensor_cache import read_index

    ckpt = make_synthetic_checkpoint(tmp_path / "ck", arch="deepseek_v3", num_layers=2, dtype="bfloat16")
    index = read_index(convert_checkpoint(ckpt, tmp_path / "mlc", dtype="float16"))
    assert index["model.layers.1.mlp.gate.e_score_correction_bias"]["dtype"] == "float32"
    assert index["model.layers.1.mlp.gate.weight"]["dtype"] == "float16"


def test_deepseek_v3_from_a_transformers_checkpoint(tmp_path, monkeypatch):
    """A DeepseekV3ForCausalLM saved by transformers itself (its config.json and module names), quantized by our
    quantizer with calibration Hessians (MLA projections and experts hooked one by one), converts, compiles and
    gives transformers' logits."""
    import torch
    import transformers

    from vptq_mlc.data.corpus import CALIB_DEFAULT, load_text
    from vptq_mlc.quantize.hessian import collect_hessians
    from vptq_mlc.quantize.pipeline import QuantizeSettings, quantize_model
    from vptq_mlc.testing.synthetic import synthetic_tokenizer_json

    hf = _hf("deepseek_v3", num_key_value_heads=4, num_hidden_layers=2)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k != "torch_dtype"}))
    with torch.no_grad():  # a non-zero score correction, so that it matters which experts win
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text(synthetic_tokenizer_json(512))

    H = collect_hessians(tmp_path / "dense", load_text(None, default=CALIB_DEFAULT), 2, n_tokens=256, seq_len=64,
                         progress=False)
    attn = "model.layers.0.self_attn"
    torch.testing.assert_close(H[f"{attn}.q_a_proj"], H[f"{attn}.kv_a_proj_with_mqa"])  # one input, two hooks
    assert H[f"{attn}.q_b_proj"].shape == (32, 32) and "model.layers.1.mlp.shared_experts.down_proj" in H
    routed = [e for e in range(8) if f"model.layers.1.mlp.experts.{e}.gate_proj" in H]
    assert len(routed) >= 2  # the experts that calibration tokens reached
    monkeypatch.setenv("VPTQ_MLC_CACHE", str(tmp_path / "cache"))  # the Hessian cache stays in the test
    settings = QuantizeSettings(variant="v8-k64-0", calib_tokens=256, calib_seq_len=64)
    ckpt = quantize_model(tmp_path / "dense", tmp_path / "q", settings, False).out_dir
    model_dir = convert_checkpoint(ckpt, tmp_path / "mlc", dtype="float32")
    (lib,) = compile_model(model_dir, "llvm", tmp_path / "lib.so")
    assert_logits_match_reference(ckpt, model_dir, lib, PREFILL, DECODE, seed=2)
