"""Llama 2 / 3 / 3.1 (incl. llama3 RoPE scaling): HF `LlamaForCausalLM` onto the shared decoder."""

from collections.abc import Mapping
from typing import Any

from vptq_mlc.model.config import DecoderConfig


def config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    return DecoderConfig.from_hf(hf)
