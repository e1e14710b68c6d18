"""What the checkpoint layer knows about the supported HF architectures: module paths, linear shapes, and the
dense tensors a complete checkpoint must hold. (The compute graph itself lives in model/.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vptq_mlc.errors import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
_ARCH_CLASSES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
ATTN_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")


def detect_arch(hf_config: Mapping[str, Any]) -> str:
    """"llama" | "qwen2" | "mistral" from `model_type` (or `architectures`); anything else is an error."""
    mt = str(hf_config.get("model_type") or "").lower()
    if mt in SUPPORTED_ARCHS:
        return mt
    for a in hf_config.get("architectures") or []:
        if a in _ARCH_CLASSES:
            return _ARCH_CLASSES[a]
    found = mt or ",".join(hf_config.get("architectures") or []) or "none"
    raise CheckpointError(f"unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHS)}")


def num_layers(hf_config: Mapping[str, Any]) -> int:
    try:
        return int(hf_config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("config.json lacks an integer num_hidden_layers; fix config.json") from None


def linear_shapes(hf_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Leaf name -> (in_features, out_features) of each quantizable linear of a decoder layer."""
    try:
        h = int(hf_config["hidden_size"])
        nh = int(hf_config["num_attention_heads"])
        nkv = int(hf_config.get("num_key_value_heads") or nh)
        hd = int(hf_config.get("head_dim") or h // nh)
        inter = int(hf_config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"config.json lacks architecture key {e}; fix config.json") from None
    return {
        "q_proj": (h, nh * hd),
        "k_proj": (h, nkv * hd),
        "v_proj": (h, nkv * hd),
        "o_proj": (nh * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def linear_module_paths(n_layers: int) -> list[str]:
    """Full module paths of every quantizable linear, in model order."""
    out = []
    for i in range(n_layers):
        out += [f"model.layers.{i}.self_attn.{n}" for n in ATTN_LEAVES]
        out += [f"model.layers.{i}.mlp.{n}" for n in MLP_LEAVES]
    return out


def has_linear_bias(arch: str, leaf: str) -> bool:
    """Qwen2's q/k/v projections carry a bias; no other linear of these architectures does."""
    return arch == "qwen2" and leaf in ("q_proj", "k_proj", "v_proj")


def required_dense(hf_config: Mapping[str, Any], quantized: set[str]) -> dict[str, tuple[int, ...]]:
    """Dense tensor name -> shape that a complete checkpoint of this architecture must store."""
    arch = detect_arch(hf_config)
    h = int(hf_config["hidden_size"])
    vocab = int(hf_config["vocab_size"])
    n = num_layers(hf_config)
    shapes = linear_shapes(hf_config)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not hf_config.get("tie_word_embeddings", False) and "lm_head" not in quantized:
        out["lm_head.weight"] = (vocab, h)
    for i in range(n):
        out[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
    for path in linear_module_paths(n):
        if path in quantized:
            continue
        leaf = path.rsplit(".", 1)[1]
        i_f, o_f = shapes[leaf]
        out[f"{path}.weight"] = (o_f, i_f)
        if has_linear_bias(arch, leaf):
            out[f"{path}.bias"] = (o_f,)
    return out
