"""Read `mlc-chat-config.json` (MLC-LLM schema, shared/docs/mlc-artifacts.md §2): what the runtime needs of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vptq_mlc.errors import RuntimeLoadError

CHAT_CONFIG = "mlc-chat-config.json"


@dataclass
class ChatConfig:
    """Sizes, special token ids and sampling defaults. Missing keys take MLC's system defaults."""

    context_window_size: int
    prefill_chunk_size: int
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    sliding_window_size: int = -1
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tokenizer_files: list[str] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatConfig:
        path = Path(model_dir) / CHAT_CONFIG
        if not path.is_file():
            raise RuntimeLoadError(f"no {CHAT_CONFIG} in {model_dir}; point at a model dir written by `vptq-mlc convert`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RuntimeLoadError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-run `vptq-mlc convert`") from e
        try:
            eos = raw.get("eos_token_id", 2)
            mc = raw.get("model_config", {})
            return cls(
                context_window_size=int(raw.get("context_window_size", mc.get("context_window_size", -1))),
                prefill_chunk_size=int(raw.get("prefill_chunk_size", mc.get("prefill_chunk_size", -1))),
                vocab_size=int(raw.get("vocab_size", mc.get("vocab_size", 0))),
                eos_token_ids=[int(t) for t in (eos if isinstance(eos, list) else [eos])],
                bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
                sliding_window_size=int(raw.get("sliding_window_size", -1)),
                temperature=float(raw.get("temperature", 1.0)),
                top_p=float(raw.get("top_p", 1.0)),
                repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
                presence_penalty=float(raw.get("presence_penalty", 0.0)),
                frequency_penalty=float(raw.get("frequency_penalty", 0.0)),
                tokenizer_files=list(raw.get("tokenizer_files", [])),
                model_config=dict(mc),
                raw=raw,
            )
        except (TypeError, ValueError) as e:
            raise RuntimeLoadError(f"{path} has a malformed field ({e}); re-run `vptq-mlc convert`") from e
