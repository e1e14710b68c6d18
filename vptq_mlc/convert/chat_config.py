"""What convert puts into `mlc-chat-config.json` (artifact/chat_config.py: ChatConfig): sizes from the model config,
sampling defaults and special tokens from the source's generation/tokenizer configs, the tokenizer's kind."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.checkpoint.arch import DecoderConfig
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

_SAMPLING_DEFAULTS = {
    "temperature": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_p": 1.0,
}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def quantization_name(layers: Mapping[str, VPTQLayerConfig]) -> str:
    """`vptq-v8-k65536-256`, or `vptq-mixed` when layers use different variants."""
    names = sorted({c.variant.name for c in layers.values()})
    return f"vptq-{names[0]}" if len(names) == 1 else "vptq-mixed"


def tokenizer_info(model_dir: Path) -> dict[str, Any]:
    """How detokenization works, detected the way MLC does (byte-level BPE vs sentencepiece byte fallback)."""
    tok = _json(model_dir / "tokenizer.json")
    decoder = tok.get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    byte_level = "ByteLevel" in kinds
    return {
        "token_postproc_method": "byte_level" if byte_level else "byte_fallback",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": not byte_level and "Strip" in kinds,
    }


def build_chat_config(
    *,
    arch: str,
    model_config: DecoderConfig,
    layers: Mapping[str, VPTQLayerConfig],
    dtype: str,
    hf_config: Mapping[str, Any],
    source_dir: Path,
    out_dir: Path,
    tokenizer_files: list[str],
    layouts: tuple[str, ...] = ("generic",),
) -> ChatConfig:
    gen = _json(source_dir / "generation_config.json")
    tok_cfg = _json(source_dir / "tokenizer_config.json")

    def pick(key: str, default: Any) -> Any:  # generation_config.json wins over config.json (as in MLC)
        for src in (gen, hf_config):
            if src.get(key) is not None:
                return src[key]
        return default

    return ChatConfig(
        model_type=arch,
        quantization=quantization_name(layers),
        model_config=model_config.to_json(),
        vocab_size=model_config.vocab_size,
        context_window_size=model_config.context_window_size,
        sliding_window_size=model_config.sliding_window_size,
        prefill_chunk_size=model_config.prefill_chunk_size,
        attention_sink_size=-1,
        tensor_parallel_shards=1,
        pipeline_parallel_stages=1,
        active_vocab_size=model_config.vocab_size,
        **{k: pick(k, d) for k, d in _SAMPLING_DEFAULTS.items()},
        tokenizer_files=tokenizer_files,
        tokenizer_info=tokenizer_info(out_dir),
        conv_template="hf_chat_template" if tok_cfg.get("chat_template") else "raw",
        chat_template=tok_cfg.get("chat_template"),
        pad_token_id=pick("pad_token_id", 0),
        bos_token_id=pick("bos_token_id", 1),
        eos_token_id=pick("eos_token_id", 2),
        model_task="chat",
        model_dtype=dtype,
        vptq={"layout": "generic", "layouts": list(layouts), "layers": {p: c.to_json() for p, c in layers.items()}},
    )
