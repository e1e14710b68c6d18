"""HF config -> DecoderConfig per architecture. Free of tvm.relax so `convert` also runs on runtime-only hosts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vptq_mlc.errors import CheckpointError
from vptq_mlc.model import llama, mistral, qwen2
from vptq_mlc.model.config import DecoderConfig

CONFIG_FROM_HF: dict[str, Callable[[Mapping[str, Any]], DecoderConfig]] = {
    "llama": llama.config_from_hf,
    "mistral": mistral.config_from_hf,
    "qwen2": qwen2.config_from_hf,
}


def decoder_config_from_hf(arch: str, hf: Mapping[str, Any]) -> DecoderConfig:
    if arch not in CONFIG_FROM_HF:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {', '.join(CONFIG_FROM_HF)}")
    return CONFIG_FROM_HF[arch](hf)
