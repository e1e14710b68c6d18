"""Mistral: Llama's tree; a sliding window shorter than max_position_embeddings caps the context window."""

from collections.abc import Mapping
from typing import Any

from vptq_mlc.model.config import DecoderConfig


def config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    return DecoderConfig.from_hf(hf)
