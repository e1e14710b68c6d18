"""`mlc-chat-config.json` (MLC-LLM's schema, docs/mlc-artifacts.md section 2, plus our `vptq` section): the one
dataclass that convert writes and compile, the runtime, serve and the benchmarks read."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vptq_mlc.artifact.files import CHAT_CONFIG
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import CheckpointError, ModelDirError, VPTQMLCError

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
        layers = self.vptq.get("layers", {})
        if not isinstance(layers, dict):
            raise ModelDirError(f"{CHAT_CONFIG} vptq.layers must map module paths to layer configs; "
                                "re-run `vptq-mlc convert`")
        try:
            return {p: VPTQLayerConfig.from_json(c, where=p) for p, c in layers.items()}
        except (CheckpointError, AttributeError) as e:
            why = str(e).removesuffix("; fix config.json") if isinstance(e, CheckpointError) else "not an object"
            raise ModelDirError(f"{CHAT_CONFIG} vptq.layers: {why}; re-run `vptq-mlc convert`") from None

    def check_buildable(self, where: str = CHAT_CONFIG) -> None:
        """What compile needs beyond what the runtime reads (a one-line ModelDirError otherwise): the model type,
        integer sizes >= 1 and a positive norm epsilon in `model_config`, a supported dtype, a well-formed `vptq`."""
        def bad(what: str) -> ModelDirError:
            return ModelDirError(f"{where} is invalid: {what}; re-run `vptq-mlc convert`")

        for key in ("model_type", "quantization"):
            if not isinstance(getattr(self, key), str):
                raise bad(f"{key!r} must be a string, found {getattr(self, key)!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise bad(f"model_dtype {self.model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        mc = self.model_config
        if not mc:
            raise bad("'model_config' is missing")
        for key in REQUIRED_SIZES + OPTIONAL_SIZES:
            value = mc.get(key, 1 if key in OPTIONAL_SIZES else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"model_config.{key} must be an integer >= 1, found {value!r}")
        eps = mc.get("rms_norm_eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise bad(f"model_config.rms_norm_eps must be a positive number, found {eps!r}")
        if self.embedding_dtype not in MODEL_DTYPES:
            raise bad(f"vptq.embedding_dtype {self.embedding_dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        if self.codebook_dtype not in MODEL_DTYPES:
            raise bad(f"vptq.codebook_dtype {self.codebook_dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
        layouts = self.vptq.get("layouts", [])
        if not isinstance(layouts, list) or not all(isinstance(x, str) for x in layouts):
            raise bad("'vptq.layouts' must be a list of layout names")
        self.vptq_layers()

    @property
    def embedding_dtype(self) -> str:
        """The stored dtype of `model.embed_tokens.weight` (and so of a tied head): `vptq.embedding_dtype` where
        convert kept the table narrower than the model (an fp32 CPU model with an fp16 table, convert's
        `embedding_dtype`), else `model_dtype`."""
        return str(self.vptq.get("embedding_dtype", self.model_dtype))

    @property
    def codebook_dtype(self) -> str:
        """The stored dtype of the VQ codebooks (`*centroids`): `vptq.codebook_dtype` where convert kept them
        narrower than the model (CPU model dirs only: the CPU kernel widens entries as it reads them), else
        `model_dtype`."""
        return str(self.vptq.get("codebook_dtype", self.model_dtype))

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
        mc = raw.get("model_config")
        mc = {} if mc is None else mc
        try:
            if not isinstance(mc, dict):
                raise TypeError(f"model_config must be an object, got {type(mc).__name__}")
            if not isinstance(raw.get("vptq", {}), dict):
                raise TypeError("vptq must be an object")
            tokenizer_files = raw.get("tokenizer_files", [])
            if not isinstance(tokenizer_files, list) or not all(isinstance(f, str) for f in tokenizer_files):
                raise TypeError("tokenizer_files must be a list of file names")
            eos = raw.get("eos_token_id", 2)
            active = raw.get("active_vocab_size")
            kw = {k: v for k, v in raw.items() if k in names}
            kw.update(
                model_config=mc,
                vocab_size=_int(raw.get("vocab_size", mc.get("vocab_size", 0))),
                context_window_size=_int(raw.get("context_window_size", mc.get("context_window_size", -1))),
                prefill_chunk_size=_int(raw.get("prefill_chunk_size", mc.get("prefill_chunk_size", -1))),
                sliding_window_size=_int(raw.get("sliding_window_size", -1)),
                active_vocab_size=None if active is None else _int(active),
                temperature=_float(raw.get("temperature", 1.0)),
                top_p=_float(raw.get("top_p", 1.0)),
                repetition_penalty=_float(raw.get("repetition_penalty", 1.0)),
                presence_penalty=_float(raw.get("presence_penalty", 0.0)),
                frequency_penalty=_float(raw.get("frequency_penalty", 0.0)),
                tokenizer_files=list(tokenizer_files),
                bos_token_id=None if raw.get("bos_token_id") is None else _int(raw["bos_token_id"]),
                eos_token_id=[_int(t) for t in eos] if isinstance(eos, list) else _int(eos),
                vptq=dict(raw.get("vptq") or {}),
                extra={k: v for k, v in raw.items() if k not in names},
            )
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"{where} has a malformed field ({e}); re-run `vptq-mlc convert`") from e

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatConfig:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelDirError(f"model directory {model_dir} does not exist; check the path (or make it with "
                                f"`vptq-mlc convert CHECKPOINT -o {model_dir}`)")
        path = model_dir / CHAT_CONFIG
        if not path.is_file():
            if (model_dir / "config.json").is_file():
                raise ModelDirError(f"{model_dir} is a checkpoint, not a converted model dir: run `vptq-mlc convert "
                                    f"{model_dir} -o {_sibling_output(model_dir)}` and use that directory")
            raise ModelDirError(f"no {CHAT_CONFIG} in {model_dir}; point at a model dir written by "
                                f"`vptq-mlc convert CHECKPOINT -o {model_dir}`")
        raw = read_json_object(path, "re-run `vptq-mlc convert`")
        return cls.from_json(raw, where=str(path))

    def write(self, model_dir: str | Path) -> Path:
        """Write `mlc-chat-config.json` into `model_dir` (indent 2, as MLC-LLM writes it)."""
        path = Path(model_dir) / CHAT_CONFIG
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


# model_config entries compile needs (sizes: integers >= 1); the rest have defaults.
REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                  "num_key_value_heads", "head_dim")
OPTIONAL_SIZES = ("context_window_size", "prefill_chunk_size", "max_batch_size")
MODEL_DTYPES = ("float16", "float32")


def _int(value: object) -> int:
    """An integer field: ints, or floats/strings holding one (older writers); not booleans, null or containers."""
    if isinstance(value, (bool, list, dict)) or value is None:
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def _float(value: object) -> float:
    if isinstance(value, (bool, list, dict)) or value is None:
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def read_json_object(path: Path, fix: str, error: type[VPTQMLCError] = ModelDirError) -> dict[str, Any]:
    """A JSON file that must hold an object (model-dir configs); anything else is a one-line `error` ending in `fix`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {type(value).__name__}; {fix}")
    return value


def _sibling_output(checkpoint: Path) -> str:
    """Where to convert a checkpoint: `<checkpoint>-mlc` next to it, never inside it."""
    name = f"{checkpoint.resolve().name}-mlc"
    if checkpoint.is_absolute():
        return str(checkpoint.resolve().parent / name)
    return os.path.relpath(checkpoint.resolve().parent / name)
