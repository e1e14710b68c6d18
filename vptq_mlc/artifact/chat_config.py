"""`mlc-chat-config.json` (MLC-LLM's schema, docs/mlc-artifacts.md section 2, plus our `vptq` section): the one
dataclass that convert writes and compile, the runtime, serve and the benchmarks read."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vptq_mlc.artifact.files import CHAT_CONFIG
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import ModelDirError

MLC_CHAT_CONFIG_VERSION = "0.1.0"


@dataclass
class ChatConfig:
    """Every key we write, in the order we write it; missing keys take MLC's system defaults on reading, and keys
    we do not model are kept in `extra` (written after ours) so a read-modify-write keeps them."""

    model_type: str = ""
    quantization: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)  # the registry's config (checkpoint/arch.py).to_json()
    vocab_size: int = 0
    context_window_size: int = -1
    sliding_window_size: int = -1
    prefill_chunk_size: int = -1
    attention_sink_size: int = -1
    tensor_parallel_shards: int = 1
    pipeline_parallel_stages: int = 1
    active_vocab_size: int | None = None
    temperature: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_p: float = 1.0
    tokenizer_files: list[str] = field(default_factory=list)
    tokenizer_info: dict[str, Any] = field(default_factory=dict)
    conv_template: str = "raw"
    chat_template: str | None = None
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] = 2
    model_task: str = "chat"
    model_dtype: str = "float16"
    vptq: dict[str, Any] = field(default_factory=dict)  # {"layout", "layouts", "layers": {path: LayerCfg}}
    version: str = MLC_CHAT_CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- the vptq section and derived views ----------------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [int(t) for t in (eos if isinstance(eos, list) else [eos])]

    def vptq_layers(self) -> dict[str, VPTQLayerConfig]:
        """The quantized linears recorded in the `vptq` section (module path -> config)."""
        return {p: VPTQLayerConfig.from_json(c, where=p) for p, c in self.vptq.get("layers", {}).items()}

    @property
    def layouts(self) -> tuple[str, ...]:
        """Kernel layouts the model dir's tensor cache carries (`generic` always; `code-sorted` entries for layers
        with large codebooks since that layout exists). Older dirs have no `layouts` key: generic only."""
        return tuple(self.vptq.get("layouts", [self.vptq.get("layout", "generic")]))

    # ---- JSON ----------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out = {"version": self.version}
        for f in dataclasses.fields(self):
            if f.name not in ("version", "extra"):
                out[f.name] = getattr(self, f.name)
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = CHAT_CONFIG) -> ChatConfig:
        """Parse, filling what is missing the way MLC does (sizes fall back to `model_config`'s)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        mc = dict(raw.get("model_config") or {})
        try:
            eos = raw.get("eos_token_id", 2)
            active = raw.get("active_vocab_size")
            kw = {k: v for k, v in raw.items() if k in names}
            kw.update(
                model_config=mc,
                vocab_size=int(raw.get("vocab_size", mc.get("vocab_size", 0))),
                context_window_size=int(raw.get("context_window_size", mc.get("context_window_size", -1))),
                prefill_chunk_size=int(raw.get("prefill_chunk_size", mc.get("prefill_chunk_size", -1))),
                sliding_window_size=int(raw.get("sliding_window_size", -1)),
                active_vocab_size=None if active is None else int(active),
                temperature=float(raw.get("temperature", 1.0)),
                top_p=float(raw.get("top_p", 1.0)),
                repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
                presence_penalty=float(raw.get("presence_penalty", 0.0)),
                frequency_penalty=float(raw.get("frequency_penalty", 0.0)),
                tokenizer_files=list(raw.get("tokenizer_files", [])),
                bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
                eos_token_id=[int(t) for t in eos] if isinstance(eos, list) else int(eos),
                vptq=dict(raw.get("vptq") or {}),
                extra={k: v for k, v in raw.items() if k not in names},
            )
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{where} has a malformed field ({e}); re-run `vptq-mlc convert`") from e

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatConfig:
        path = Path(model_dir) / CHAT_CONFIG
        if not path.is_file():
            raise ModelDirError(f"no {CHAT_CONFIG} in {model_dir}; point at a model dir written by "
                                f"`vptq-mlc convert CHECKPOINT -o {model_dir}`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelDirError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-run `vptq-mlc convert`"
                                ) from e
        if not isinstance(raw, dict):
            raise ModelDirError(f"{path} is not a JSON object; re-run `vptq-mlc convert`")
        return cls.from_json(raw, where=str(path))

    def write(self, model_dir: str | Path) -> Path:
        """Write `mlc-chat-config.json` into `model_dir` (indent 2, as MLC-LLM writes it)."""
        path = Path(model_dir) / CHAT_CONFIG
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path
