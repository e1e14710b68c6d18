"""Qwen2 / Qwen2.5: Llama's tree plus a bias on q/k/v (always on in HF's Qwen2Attention)."""

from collections.abc import Mapping
from typing import Any

from vptq_mlc.model.config import DecoderConfig


def config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    return DecoderConfig.from_hf(hf, attention_bias=True)
