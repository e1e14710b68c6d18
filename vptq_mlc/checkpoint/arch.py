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

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")



CACHE_HEAD_MULTIPLE = 32  # DeepSeek-V3's padded KV-cache head width is a multiple of this (see deepseek_v3_config)

def _rope_pos_freqs(base: float, dim: int) -> Any:
    """base ** (arange(0, dim, 2) / dim) in float32, as transformers computes it; inv_freq is its reciprocal,
    which each RoPE type then rescales."""
    import numpy as np

    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return np.float32(base) ** exps


def _default_inv_freq(base: float, dim: int) -> list[float]:
    import numpy as np

    return (1.0 / _rope_pos_freqs(base, dim)).astype(np.float32).tolist()


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    """transformers' yarn get_mscale: the attention scale correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(rs: Mapping[str, Any], base: float, dim: int, max_pos: int) -> tuple[list[float], float]:
    import numpy as np

    factor = float(rs["factor"])
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    orig = int(rs.get("original_max_position_embeddings") or max_pos)

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
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
    pos_freqs = _rope_pos_freqs(base, dim)
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
    inv = 1.0 / (short * _rope_pos_freqs(base, dim))
    return inv.astype(np.float32).tolist(), float(attention_factor), int(orig)


def _apply_rope(cfg: DecoderConfig, hf: Mapping[str, Any], rotary_dim: int | None = None,
                types: tuple[str, ...] = ROPE_TYPES) -> None:
    """Fill the RoPE fields of `cfg` from `rope_theta` and `rope_scaling` the way transformers reads them.
    `rotary_dim` (default head_dim) is the width RoPE rotates; a family that rotates only part of each head (MLA)
    passes it and always gets `rope_inv_freq`, since TVM's cache rotates whole heads."""
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json field partial_rotary_factor != 1 is not supported (RoPE on all dims)")
    rs = hf.get("rope_scaling")
    base, max_pos = cfg.position_embedding_base, int(hf.get("max_position_embeddings", 4096))
    dim = rotary_dim or cfg.head_dim
    if rotary_dim is not None:
        cfg.rope_inv_freq = _default_inv_freq(base, dim)
    if not rs:
        return
    if not isinstance(rs, Mapping):
        raise CheckpointError("config.json field rope_scaling must be an object or null; fix config.json")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in types:
        raise CheckpointError(
            f"config.json field rope_scaling type {kind!r} is not supported; supported: {', '.join(types)}"
        )
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


def _gated_mlp(module: str, width: Callable[[Any], int], bias: Callable[[Any], bool],
               in_layer: Callable[[Any, int], bool] = _every_layer,
               copies: Callable[[Any], int] | None = None) -> tuple[LinearSpec, ...]:
    """gate_proj, up_proj (hidden -> width) and down_proj (width -> hidden) of a SwiGLU MLP at `module`."""
    return (
        LinearSpec(module, "gate_proj", lambda c: (c.hidden_size, width(c)), bias, in_layer, copies),
        LinearSpec(module, "up_proj", lambda c: (c.hidden_size, width(c)), bias, in_layer, copies),
        LinearSpec(module, "down_proj", lambda c: (width(c), c.hidden_size), bias, in_layer, copies),
    )


LLAMA_LINEARS = (
    LinearSpec("self_attn", "q_proj", _q, lambda c: c.attention_bias),
    LinearSpec("self_attn", "k_proj", _kv, lambda c: c.attention_bias),
    LinearSpec("self_attn", "v_proj", _kv, lambda c: c.attention_bias),
    LinearSpec("self_attn", "o_proj", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
               lambda c: c.attention_out_bias),
    *_gated_mlp("mlp", lambda c: c.intermediate_size, lambda c: c.mlp_bias),
)

# ---------------------------------------------------------------- DeepSeek-V3 / R1: MLA attention + mixture of experts


@dataclass
class DeepseekV3Config(DecoderConfig):
    """`DecoderConfig` plus MLA and MoE numbers. `head_dim` is the per-head width of the KV cache, which holds the
    decompressed K and V of every head (max of qk_nope + qk_rope and v_head_dim, the shorter one zero-padded), and
    `num_key_value_heads` equals `num_attention_heads`; `rope_inv_freq` always holds the frequencies of the
    `qk_rope_head_dim` rotated dims (the model rotates them; the cache applies no RoPE)."""

    q_lora_rank: int | None = None  # None: one q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # rotate (x0, x2, ...), (x1, x3, ...) halves, as transformers' rope_interleave
    softmax_scale: float = 0.0  # qk_head_dim ** -0.5, times yarn mscale(factor, mscale_all_dim) ** 2
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace


DEEPSEEK_ROPE_TYPES = ("default", "linear", "yarn")


def _deepseek_refuse(hf: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(f"config.json field {key} {value!r} is not supported for deepseek_v3; supported: "
                              f"{', '.join(map(repr, allowed))}")


def deepseek_v3_config(hf: Mapping[str, Any]) -> DeepseekV3Config:
    """transformers 4.57's DeepseekV3Config semantics (its defaults for absent fields)."""
    # transformers writes head_dim = qk_rope_head_dim into config.json; the cache's head width is ours to choose
    base = _base_config({**{k: v for k, v in hf.items() if k not in ("rope_scaling", "head_dim")},
                         "intermediate_size": hf.get("intermediate_size", 18432)})
    heads = base.num_attention_heads
    if base.num_key_value_heads != heads:
        raise CheckpointError(f"config.json: deepseek_v3 needs num_key_value_heads == num_attention_heads ({heads}), "
                              f"found {base.num_key_value_heads}; fix config.json")
    for key, allowed, default in (("scoring_func", ("sigmoid",), "sigmoid"), ("topk_method", ("noaux_tc",), "noaux_tc"),
                                  ("moe_layer_freq", (1,), 1)):
        _deepseek_refuse(hf, key, allowed, default)
    q_lora = hf.get("q_lora_rank", 1536)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecoderConfig)}
    cfg = DeepseekV3Config(
        **fields,
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(hf.get("kv_lora_rank", 512)),
        qk_nope_head_dim=int(hf.get("qk_nope_head_dim", 128)),
        qk_rope_head_dim=int(hf.get("qk_rope_head_dim", 64)),
        v_head_dim=int(hf.get("v_head_dim", 128)),
        rope_interleave=bool(hf.get("rope_interleave", True)),
        moe_intermediate_size=int(hf.get("moe_intermediate_size", 2048)),
        n_routed_experts=int(hf.get("n_routed_experts", 256)),
        n_shared_experts=int(hf.get("n_shared_experts", 1) or 0),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
        n_group=int(hf.get("n_group", 8) or 1),
        topk_group=int(hf.get("topk_group", 4) or 1),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
        first_k_dense_replace=int(hf.get("first_k_dense_replace", 3)),
    )
    cfg.attention_bias = cfg.attention_out_bias = bool(hf.get("attention_bias", False))
    cfg.num_key_value_heads = heads
    # the cache's head width: TVM's CUDA decode-attention kernel gives each head width / 4 threads in x and fills a
    # 512-thread block along z, so a width under 32 asks for more than CUDA's 64 threads in z (a launch error);
    # a multiple of 32 (R1: 192 already) avoids it, and the zero padding changes neither q.k nor v's columns
    cfg.head_dim = -(-max(cfg.qk_head_dim, cfg.v_head_dim) // CACHE_HEAD_MULTIPLE) * CACHE_HEAD_MULTIPLE
    if cfg.qk_rope_head_dim <= 0 or cfg.qk_rope_head_dim % 2:
        raise CheckpointError(f"config.json: qk_rope_head_dim {cfg.qk_rope_head_dim} must be even and positive")
    if cfg.n_shared_experts < 1:
        raise CheckpointError("config.json: deepseek_v3 with n_shared_experts < 1 is not supported; fix config.json")
    group = cfg.n_routed_experts // cfg.n_group
    if cfg.n_routed_experts % cfg.n_group or group < 2:
        raise CheckpointError(f"config.json: n_routed_experts {cfg.n_routed_experts} must split into n_group "
                              f"{cfg.n_group} groups of at least 2 experts (transformers ranks groups by their top 2)")
    if not 1 <= cfg.topk_group <= cfg.n_group or not 1 <= cfg.num_experts_per_tok <= cfg.topk_group * group:
        raise CheckpointError(f"config.json: num_experts_per_tok {cfg.num_experts_per_tok} must be between 1 and "
                              f"topk_group {cfg.topk_group} x {group} experts per group, topk_group <= n_group")
    _apply_rope(cfg, hf, rotary_dim=cfg.qk_rope_head_dim, types=DEEPSEEK_ROPE_TYPES)
    cfg.softmax_scale = cfg.qk_head_dim ** -0.5
    rs = hf.get("rope_scaling")
    if rs and rs.get("mscale_all_dim"):  # transformers' DeepseekV3Attention: scaling * mscale ** 2
        mscale = _yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        cfg.softmax_scale *= mscale * mscale
    return cfg


def _ds_attn(leaf: str, shape: Callable[[Any], tuple[int, int]], bias: Callable[[Any], bool],
             when: Callable[[Any], bool] = lambda c: True) -> LinearSpec:
    return LinearSpec("self_attn", leaf, shape, bias, in_layer=lambda c, i: when(c))


def _no_bias(cfg: Any) -> bool:
    return False


DEEPSEEK_V3_LINEARS = (
    _ds_attn("q_proj", lambda c: (c.hidden_size, c.num_attention_heads * c.qk_head_dim), lambda c: False,
             lambda c: c.q_lora_rank is None),
    _ds_attn("q_a_proj", lambda c: (c.hidden_size, c.q_lora_rank or 0), lambda c: c.attention_bias,
             lambda c: c.q_lora_rank is not None),
    _ds_attn("q_b_proj", lambda c: (c.q_lora_rank or 0, c.num_attention_heads * c.qk_head_dim), lambda c: False,
             lambda c: c.q_lora_rank is not None),
    _ds_attn("kv_a_proj_with_mqa", lambda c: (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim),
             lambda c: c.attention_bias),
    _ds_attn("kv_b_proj", lambda c: (c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)),
             lambda c: False),
    _ds_attn("o_proj", lambda c: (c.num_attention_heads * c.v_head_dim, c.hidden_size), lambda c: c.attention_bias),
    *_gated_mlp("mlp", lambda c: c.intermediate_size, _no_bias, lambda c, i: not c.is_moe_layer(i)),
    *_gated_mlp("mlp.experts.{e}", lambda c: c.moe_intermediate_size, _no_bias, lambda c, i: c.is_moe_layer(i),
                lambda c: c.n_routed_experts),
    *_gated_mlp("mlp.shared_experts", lambda c: c.moe_intermediate_size * c.n_shared_experts, _no_bias,
                lambda c, i: c.is_moe_layer(i)),
)


def _layer_norms(cfg: Any, i: int) -> dict[str, tuple[int, ...]]:
    """The two RMSNorm weights every decoder layer has (before attention, before the MLP)."""
    return {
        f"model.layers.{i}.input_layernorm.weight": (cfg.hidden_size,),
        f"model.layers.{i}.post_attention_layernorm.weight": (cfg.hidden_size,),
    }


def deepseek_v3_layer_dense(cfg: DeepseekV3Config, i: int) -> dict[str, tuple[int, ...]]:
    p, h = f"model.layers.{i}", cfg.hidden_size
    out = {**_layer_norms(cfg, i), f"{p}.self_attn.kv_a_layernorm.weight": (cfg.kv_lora_rank,)}
    if cfg.q_lora_rank is not None:
        out[f"{p}.self_attn.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
    if cfg.is_moe_layer(i):
        out[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
        out[f"{p}.mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
    return out


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
    # dense tensors (by name suffix) kept in float32 whatever the model dtype: values whose small differences decide
    # something discrete (a router's score-correction bias picks experts)
    float32_dense: tuple[str, ...] = ()
    # whether compile --split-functions (model/split.py, the Llama layer's linears) can cut this tree per layer
    supports_split: bool = True
    # dense tensors of layer i besides its linears (norms, a router's gate, ...): name -> shape
    layer_dense: Callable[[Any, int], dict[str, tuple[int, ...]]] = _layer_norms

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
    "deepseek_v3": Architecture(
        name="deepseek_v3",
        hf_classes=("DeepseekV3ForCausalLM",),
        config_from_hf=deepseek_v3_config,
        linears=DEEPSEEK_V3_LINEARS,
        module_tree="vptq_mlc.model.deepseek_v3:DeepseekV3ForCausalLM",
        config_class=DeepseekV3Config,
        layer_dense=deepseek_v3_layer_dense,
        supports_split=False,
        float32_dense=("e_score_correction_bias",),
        hf_fields={
            **{k: v for k, v in _COMMON_FIELDS.items() if k != "head_dim"},
            "num_key_value_heads": "must equal num_attention_heads (K/V are per head after kv_b_proj)",
            "intermediate_size": "width of the first_k_dense_replace dense MLPs",
            "rope_scaling": "default, linear, yarn (on the qk_rope_head_dim dims); other types refused",
            "head_dim": "ignored: transformers sets it to qk_rope_head_dim, which is what RoPE uses",
            "attention_bias": "bias on q_a_proj, kv_a_proj_with_mqa and o_proj (as transformers)",
            "q_lora_rank": "null: one q_proj; else q_a_proj -> q_a_layernorm (eps 1e-6) -> q_b_proj",
            "kv_lora_rank": "width of the compressed KV (kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj)",
            "qk_nope_head_dim": "per-head q/k width without RoPE",
            "qk_rope_head_dim": "per-head q/k width with RoPE (k's shared by all heads)",
            "v_head_dim": "per-head value width",
            "rope_interleave": "rotate the even/odd dims as pairs (default true), as transformers",
            "moe_intermediate_size": "width of each routed expert and (times n_shared_experts) the shared expert",
            "n_routed_experts": "routed experts per MoE layer",
            "n_shared_experts": "shared expert width multiplier (>= 1)",
            "num_experts_per_tok": "experts per token (top-k after group limiting)",
            "n_group": "expert groups, ranked by the sum of each group's top-2 biased scores",
            "topk_group": "groups kept per token",
            "norm_topk_prob": "divide the selected sigmoid scores by their sum (+1e-20)",
            "routed_scaling_factor": "multiplies the routing weights",
            "first_k_dense_replace": "the first layers have a dense MLP instead of experts",
            "scoring_func": "sigmoid only (transformers' only one); anything else refused",
            "topk_method": "noaux_tc only (e_score_correction_bias); anything else refused",
            "moe_layer_freq": "1 only (transformers ignores it; other values would change which layers are MoE)",
            "num_nextn_predict_layers": "ignored: the multi-token-prediction layer is not used for generation "
                                        "(transformers skips it too)",
            "ep_size": "ignored (expert-parallel training setting)",
            "aux_loss_alpha": "training only; ignored",
            "seq_aux": "training only; ignored",
            "pretraining_tp": "ignored (transformers 4.57 ignores it too)",
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
