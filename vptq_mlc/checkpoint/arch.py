"""The architecture registry: everything about a supported HF architecture except its compute graph.

One `Architecture` entry per HF `model_type` says which config.json fields it honours and how (parsed into the
`DecoderConfig` dataclass, as transformers 4.57 reads them), which linears a decoder layer has, their module
paths and shapes, which carry a bias, the dense tensors a complete checkpoint stores, and where the module tree
that computes it lives (a dotted path, imported only by the model builder, so this module never needs
tvm.relax: `convert` runs on runtime-only hosts). The checkpoint reader/validator, the synthetic checkpoints,
the converter and the model builder all read this table; a new family (say MLA attention + mixture of experts)
is one more entry with its own config parser, linear list and module tree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vptq_mlc.errors import CheckpointError

# ---------------------------------------------------------------- the config the model tree and KV cache need


@dataclass
class DecoderConfig:
    """Numbers the model tree and the KV cache need; serialized as mlc-chat-config.json's `model_config`."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    position_embedding_base: float = 10000.0
    # RoPE the KV cache applies itself (TVM's llama3 formula); None with `rope_inv_freq` unset = plain RoPE
    rope_scaling: dict[str, Any] | None = None
    # RoPE the model applies before the cache (linear, yarn, longrope): transformers' inv_freq and cos/sin factor
    rope_inv_freq: list[float] | None = None
    rope_attention_factor: float = 1.0
    attention_bias: bool = False  # q/k/v projections carry a bias
    attention_out_bias: bool = False  # o_proj carries a bias
    mlp_bias: bool = False  # gate/up/down carry a bias
    context_window_size: int = 4096
    # the longest context whose math equals transformers' (0 = no limit) and the config field that sets it
    max_context_window_size: int = 0
    max_context_reason: str = ""
    prefill_chunk_size: int = 512
    sliding_window_size: int = -1
    max_batch_size: int = 16
    tensor_parallel_shards: int = 1
    pipeline_parallel_stages: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DecoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def set_context_window(self, n: int) -> None:
        """Override the context window; past `max_context_window_size` our math would leave transformers'."""
        if self.max_context_window_size and n > self.max_context_window_size:
            raise CheckpointError(
                f"context window {n} exceeds {self.max_context_window_size}, the most {self.max_context_reason} "
                f"allows here; pass a context window <= {self.max_context_window_size}"
            )
        self.context_window_size = n


# ---------------------------------------------------------------- RoPE as transformers 4.57 computes it


def _default_inv_freq(base: float, dim: int) -> list[float]:
    # transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in float32
    import numpy as np

    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(base) ** exps)).astype(np.float32).tolist()


def _yarn(rs: Mapping[str, Any], base: float, dim: int, max_pos: int) -> tuple[list[float], float]:
    import numpy as np

    factor = float(rs["factor"])
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    orig = int(rs.get("original_max_position_embeddings") or max_pos)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    extra_factor = 1 - ramp
    inv = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv.astype(np.float32).tolist(), float(attention_factor)


def _longrope(rs: Mapping[str, Any], hf: Mapping[str, Any], base: float, dim: int) -> tuple[list[float], float, int]:
    """(inv_freq from the short factors, attention factor, original context): transformers switches to the long
    factors once a sequence passes the original context, so our context stops there."""
    import numpy as np

    max_pos = int(hf.get("max_position_embeddings", 4096))
    orig = hf.get("original_max_position_embeddings")
    factor = rs.get("factor")
    if orig:
        factor = max_pos / int(orig)
    else:
        orig = max_pos
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor is None or factor <= 1.0 else math.sqrt(
            1 + math.log(factor) / math.log(int(orig)))
    short = np.asarray(rs["short_factor"], dtype=np.float32)
    if short.shape != (dim // 2,):
        raise CheckpointError(f"rope_scaling.short_factor has {short.size} entries, head_dim/2 = {dim // 2} needed")
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = 1.0 / (short * np.float32(base) ** shape)
    return inv.astype(np.float32).tolist(), float(attention_factor), int(orig)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def _apply_rope(cfg: DecoderConfig, hf: Mapping[str, Any]) -> None:
    """Fill the RoPE fields of `cfg` from `rope_theta` and `rope_scaling` the way transformers reads them."""
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json field partial_rotary_factor != 1 is not supported (RoPE on all dims)")
    rs = hf.get("rope_scaling")
    if not rs:
        return
    if not isinstance(rs, Mapping):
        raise CheckpointError("config.json field rope_scaling must be an object or null; fix config.json")
    kind = rs.get("rope_type", rs.get("type", "default"))
    base, dim, max_pos = cfg.position_embedding_base, cfg.head_dim, int(hf.get("max_position_embeddings", 4096))
    try:
        if kind == "default":
            return
        if kind == "llama3":  # TVM's paged KV cache computes llama3 frequencies exactly as transformers does
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            cfg.rope_scaling = {"rope_type": "llama3", **{k: rs[k] for k in keys}}
        elif kind == "linear":
            cfg.rope_inv_freq = [f / float(rs["factor"]) for f in _default_inv_freq(base, dim)]
        elif kind == "dynamic":
            # dynamic NTK keeps the plain frequencies up to max_position_embeddings and rescales past it
            cfg.max_context_window_size = max_pos
            cfg.max_context_reason = "rope_scaling type 'dynamic' (frequencies change past max_position_embeddings)"
        elif kind == "yarn":
            cfg.rope_inv_freq, cfg.rope_attention_factor = _yarn(rs, base, dim, max_pos)
        elif kind == "longrope":
            cfg.rope_inv_freq, cfg.rope_attention_factor, orig = _longrope(rs, hf, base, dim)
            cfg.max_context_window_size = orig
            cfg.max_context_reason = "rope_scaling type 'longrope' (long factors past original_max_position_embeddings)"
        else:
            raise CheckpointError(
                f"config.json field rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
    except KeyError as e:
        raise CheckpointError(f"config.json field rope_scaling ({kind}) lacks {e.args[0]!r}; fix config.json") from None


# ---------------------------------------------------------------- HF config.json -> DecoderConfig


def _int(hf: Mapping[str, Any], key: str) -> int:
    try:
        return int(hf[key])
    except KeyError:
        raise CheckpointError(f"config.json lacks {key!r}, needed by the model architecture") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json field {key!r} must be an integer, found {hf[key]!r}") from None


def _base_config(hf: Mapping[str, Any]) -> DecoderConfig:
    """The fields Llama, Mistral and Qwen2 read alike."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json field hidden_act {act!r} is not supported; supported: silu")
    heads, hidden = _int(hf, "num_attention_heads"), _int(hf, "hidden_size")
    ctx = int(hf.get("max_position_embeddings") or 4096)
    cfg = DecoderConfig(
        hidden_size=hidden,
        intermediate_size=_int(hf, "intermediate_size"),
        num_attention_heads=heads,
        num_hidden_layers=_int(hf, "num_hidden_layers"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        vocab_size=_int(hf, "vocab_size"),
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_base=float(hf.get("rope_theta", 10000.0)),
        context_window_size=ctx,
        prefill_chunk_size=min(ctx, 512),
    )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{cfg.num_key_value_heads}; fix config.json")
    if cfg.head_dim % 2:
        raise CheckpointError(f"config.json: head_dim {cfg.head_dim} is odd, RoPE needs an even one; fix config.json")
    _apply_rope(cfg, hf)
    if cfg.max_context_window_size:
        cfg.context_window_size = min(cfg.context_window_size, cfg.max_context_window_size)
    return cfg


def _cap_at_sliding_window(cfg: DecoderConfig, window: Any, field_name: str) -> None:
    """Sliding-window attention equals full attention while a sequence fits the window, so the context stops at
    the window (a window at least as long as the context changes nothing)."""
    if window is None:
        return
    w = int(window)
    if w <= 0:
        raise CheckpointError(f"config.json field {field_name} must be positive or null, found {window!r}")
    if w < cfg.context_window_size:
        cfg.context_window_size = w
    if not cfg.max_context_window_size or w < cfg.max_context_window_size:
        cfg.max_context_window_size = w
        cfg.max_context_reason = f"{field_name} (attention past the window is not supported)"
    cfg.prefill_chunk_size = min(cfg.prefill_chunk_size, cfg.context_window_size)


def llama_config(hf: Mapping[str, Any]) -> DecoderConfig:
    cfg = _base_config(hf)
    cfg.attention_bias = cfg.attention_out_bias = bool(hf.get("attention_bias", False))
    cfg.mlp_bias = bool(hf.get("mlp_bias", False))
    return cfg


def mistral_config(hf: Mapping[str, Any]) -> DecoderConfig:
    cfg = _base_config(hf)
    _cap_at_sliding_window(cfg, hf.get("sliding_window"), "sliding_window")
    return cfg


def qwen2_config(hf: Mapping[str, Any]) -> DecoderConfig:
    cfg = _base_config(hf)
    cfg.attention_bias = True
    n = cfg.num_hidden_layers
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(n)
    ]
    if "sliding_attention" in types:
        _cap_at_sliding_window(cfg, window, "sliding_window")
    return cfg


# ---------------------------------------------------------------- the registry


def _every_layer(cfg: Any, layer: int) -> bool:
    return True


@dataclass(frozen=True)
class LinearSpec:
    """One kind of quantizable linear: where it sits in a decoder layer and how its shape and bias follow the
    config. `in_layer` and `copies` let a family place it in some layers only (a mixture of experts' first dense
    layers) or many times per layer (`module` then holds `{e}`: "mlp.experts.{e}")."""

    module: str  # the submodule of model.layers.<i>: "self_attn", "mlp", "mlp.experts.{e}"
    leaf: str  # "q_proj", ...
    shape: Callable[[Any], tuple[int, int]]  # config -> (in_features, out_features)
    bias: Callable[[Any], bool]  # config -> whether it carries a bias
    in_layer: Callable[[Any, int], bool] = _every_layer
    copies: Callable[[Any], int] | None = None

    def paths(self, cfg: Any, layer: int) -> list[str]:
        if not self.in_layer(cfg, layer):
            return []
        if self.copies is None:
            return [f"model.layers.{layer}.{self.module}.{self.leaf}"]
        return [f"model.layers.{layer}.{self.module.format(e=e)}.{self.leaf}" for e in range(self.copies(cfg))]


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear of a model: its shape and whether it carries a bias."""

    in_features: int
    out_features: int
    bias: bool


def _q(c: DecoderConfig) -> tuple[int, int]:
    return c.hidden_size, c.num_attention_heads * c.head_dim


def _kv(c: DecoderConfig) -> tuple[int, int]:
    return c.hidden_size, c.num_key_value_heads * c.head_dim


LLAMA_LINEARS = (
    LinearSpec("self_attn", "q_proj", _q, lambda c: c.attention_bias),
    LinearSpec("self_attn", "k_proj", _kv, lambda c: c.attention_bias),
    LinearSpec("self_attn", "v_proj", _kv, lambda c: c.attention_bias),
    LinearSpec("self_attn", "o_proj", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
               lambda c: c.attention_out_bias),
    LinearSpec("mlp", "gate_proj", lambda c: (c.hidden_size, c.intermediate_size), lambda c: c.mlp_bias),
    LinearSpec("mlp", "up_proj", lambda c: (c.hidden_size, c.intermediate_size), lambda c: c.mlp_bias),
    LinearSpec("mlp", "down_proj", lambda c: (c.intermediate_size, c.hidden_size), lambda c: c.mlp_bias),
)

_COMMON_FIELDS = {
    "hidden_size": "model width",
    "intermediate_size": "MLP width",
    "num_hidden_layers": "decoder layers",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "KV heads (grouped-query attention); default num_attention_heads",
    "head_dim": "per-head width; default hidden_size / num_attention_heads",
    "vocab_size": "embedding and lm_head rows",
    "rms_norm_eps": "RMSNorm epsilon",
    "hidden_act": "silu only; anything else is refused",
    "tie_word_embeddings": "lm_head shares embed_tokens (no lm_head.weight needed)",
    "rope_theta": "RoPE base",
    "rope_scaling": "default, linear, yarn, longrope (short factors; context capped at "
                    "original_max_position_embeddings), llama3, dynamic (context capped at max_position_embeddings); "
                    "other types refused",
    "partial_rotary_factor": "1 only; other values refused",
    "max_position_embeddings": "default context window",
    "torch_dtype": "float32 stays float32, float16/bfloat16 run as float16 (convert --dtype overrides)",
    "attention_dropout": "training only; ignored (as in transformers' eval mode)",
    "initializer_range": "training only; ignored",
    "use_cache": "ignored (the paged KV cache is always used)",
    "bos_token_id": "chat config (generation_config.json wins)",
    "eos_token_id": "chat config (generation_config.json wins)",
    "pad_token_id": "chat config",
}


@dataclass(frozen=True)
class Architecture:
    """One HF architecture: its names, config parser, linears and the module tree that computes it."""

    name: str  # HF model_type, also mlc-chat-config.json's model_type
    hf_classes: tuple[str, ...]  # HF `architectures` entries that mean this one
    config_from_hf: Callable[[Mapping[str, Any]], Any]  # -> an instance of config_class
    linears: tuple[LinearSpec, ...]
    hf_fields: Mapping[str, str]  # honoured config.json field -> what we do with it (docs/architectures.md)
    module_tree: str = "vptq_mlc.model.decoder:DecoderForCausalLM"  # imported by the model builder only
    config_class: type = DecoderConfig  # mlc-chat-config.json's model_config, read back by compile
    # dense tensors of layer i besides its linears (norms, a router's gate, ...): name -> shape
    layer_dense: Callable[[Any, int], dict[str, tuple[int, ...]]] = lambda cfg, i: {
        f"model.layers.{i}.input_layernorm.weight": (cfg.hidden_size,),
        f"model.layers.{i}.post_attention_layernorm.weight": (cfg.hidden_size,),
    }

    def linear(self, leaf: str) -> LinearSpec:
        for spec in self.linears:
            if spec.leaf == leaf:
                return spec
        raise CheckpointError(f"{self.name} has no linear {leaf!r}")


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        name="llama",
        hf_classes=("LlamaForCausalLM",),
        config_from_hf=llama_config,
        linears=LLAMA_LINEARS,
        hf_fields={
            **_COMMON_FIELDS,
            "attention_bias": "bias on q_proj, k_proj, v_proj and o_proj",
            "mlp_bias": "bias on gate_proj, up_proj and down_proj",
            "pretraining_tp": "ignored (transformers 4.57 ignores it too)",
        },
    ),
    "qwen2": Architecture(
        name="qwen2",
        hf_classes=("Qwen2ForCausalLM",),
        config_from_hf=qwen2_config,
        linears=LLAMA_LINEARS,
        hf_fields={
            **_COMMON_FIELDS,
            "use_sliding_window": "enables sliding_window (default false)",
            "sliding_window": "when a layer slides: context capped at the window (identical within it)",
            "max_window_layers": "layers from this index on slide (when use_sliding_window)",
            "mlp_bias": "ignored: transformers' Qwen2 has no MLP biases",
            "layer_types": "per-layer full_attention / sliding_attention (overrides max_window_layers)",
            "attention_bias": "ignored: Qwen2 always has q/k/v biases and none on o_proj or the MLP (as transformers)",
        },
    ),
    "mistral": Architecture(
        name="mistral",
        hf_classes=("MistralForCausalLM",),
        config_from_hf=mistral_config,
        linears=LLAMA_LINEARS,
        hf_fields={
            **_COMMON_FIELDS,
            "sliding_window": "context capped at the window (full attention is identical within it); "
                              "null = no window",
            "attention_bias": "ignored: transformers' Mistral has no biases",
            "mlp_bias": "ignored: transformers' Mistral has no biases",
        },
    ),
}
SUPPORTED_ARCHS = tuple(ARCHITECTURES)


def detect_arch(hf_config: Mapping[str, Any]) -> str:
    """The registry key from `model_type` (or `architectures`); anything else is an error."""
    mt = str(hf_config.get("model_type") or "").lower()
    if mt in ARCHITECTURES:
        return mt
    for a in hf_config.get("architectures") or []:
        for arch in ARCHITECTURES.values():
            if a in arch.hf_classes:
                return arch.name
    found = mt or ",".join(hf_config.get("architectures") or []) or "none"
    raise CheckpointError(f"unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHS)}")


def get_architecture(hf_config: Mapping[str, Any]) -> Architecture:
    return ARCHITECTURES[detect_arch(hf_config)]


def decoder_config_from_hf(hf_config: Mapping[str, Any]) -> DecoderConfig:
    return get_architecture(hf_config).config_from_hf(hf_config)


def model_config_from_json(model_type: str, d: Mapping[str, Any]) -> Any:
    """mlc-chat-config.json's `model_config` read back into the architecture's config class."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}; "
                              "re-run convert")
    return ARCHITECTURES[model_type].config_class.from_json(d)


def num_layers(hf_config: Mapping[str, Any]) -> int:
    try:
        return int(hf_config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("config.json lacks an integer num_hidden_layers; fix config.json") from None


def decoder_linears(hf_config: Mapping[str, Any]) -> dict[str, LinearInfo]:
    """Module path -> shape and bias of every quantizable linear of the decoder layers, in model order."""
    arch, cfg = get_architecture(hf_config), decoder_config_from_hf(hf_config)
    out: dict[str, LinearInfo] = {}
    for i in range(num_layers(hf_config)):
        for spec in arch.linears:
            i_f, o_f = spec.shape(cfg)
            for path in spec.paths(cfg, i):
                out[path] = LinearInfo(i_f, o_f, spec.bias(cfg))
    return out


def required_dense(hf_config: Mapping[str, Any], quantized: set[str]) -> dict[str, tuple[int, ...]]:
    """Dense tensor name -> shape that a complete checkpoint of this architecture must store."""
    arch, cfg = get_architecture(hf_config), decoder_config_from_hf(hf_config)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings and "lm_head" not in quantized:
        out["lm_head.weight"] = (vocab, h)
    for i in range(cfg.num_hidden_layers):
        out.update(arch.layer_dense(cfg, i))
    for path, lin in decoder_linears(hf_config).items():
        if path not in quantized:
            out[f"{path}.weight"] = (lin.out_features, lin.in_features)
            if lin.bias:
                out[f"{path}.bias"] = (lin.out_features,)
    return out
