"""The decoder-only transformer config shared by Llama, Mistral and Qwen2, read from a HF config.json.

One dataclass serves the three architectures because they differ only in a few switches
(q/k/v bias for Qwen2, sliding window for Mistral, RoPE scaling for Llama 3.1); the per-architecture
files say which switches their HF configs set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vptq_mlc.errors import CheckpointError


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
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    context_window_size: int = 4096
    prefill_chunk_size: int = 512
    sliding_window_size: int = -1
    max_batch_size: int = 16
    tensor_parallel_shards: int = 1
    pipeline_parallel_stages: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, attention_bias: bool = False) -> DecoderConfig:
        """Build from a Hugging Face config.json dict (Llama/Mistral/Qwen2 keys)."""
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope_scaling = hf.get("rope_scaling")
            if rope_scaling:
                rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
                rope_scaling = None if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
            if rope_scaling and rope_scaling["rope_type"] not in ("llama3",):
                raise CheckpointError(
                    f"rope_scaling type {rope_scaling['rope_type']!r} is not supported; supported: llama3 (or none)"
                )
            ctx = int(hf.get("max_position_embeddings", 4096))
            sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
            if sliding and int(sliding) < ctx:
                ctx = int(sliding)  # attend within the window: cap the context rather than roll the cache
            return cls(
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_attention_heads=heads,
                num_hidden_layers=int(hf["num_hidden_layers"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                vocab_size=int(hf["vocab_size"]),
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                position_embedding_base=float(hf.get("rope_theta", 10000.0)),
                rope_scaling=rope_scaling,
                attention_bias=attention_bias or bool(hf.get("attention_bias", False)),
                context_window_size=ctx,
                prefill_chunk_size=min(ctx, 512),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r}, needed by the model architecture") from None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DecoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
