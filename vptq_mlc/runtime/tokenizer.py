"""Tokenizer for the runtime: Hugging Face `tokenizer.json` through the `tokenizers` library (no transformers).

`StreamDecoder` turns a growing list of token ids into text deltas. A single token may hold only part of a
UTF-8 character (byte-level BPE, byte-fallback `<0xE4>` tokens), and SentencePiece-style decoders treat the
first token of a decode call specially (leading-space strip), so tokens are never decoded one by one: each
step decodes a short window of recent tokens twice and emits only the new, complete text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from vptq_mlc.artifact.chat_config import read_json_object
from vptq_mlc.errors import RuntimeLoadError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REPLACEMENT = "\ufffd"


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


GIL_FREE_ENCODE_CHARS = 4096  # longer texts are encoded with the GIL released


class Tokenizer:
    """Encode/decode plus the special-token strings the chat template needs."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            other = [n for n in ("tokenizer.model", "vocab.json") if (model_dir / n).is_file()]
            hint = f" (found {', '.join(other)}; re-save it as tokenizer.json with a fast tokenizer)" if other else ""
            raise RuntimeLoadError(f"no tokenizer.json in {model_dir}{hint}; copy the model's tokenizer files there")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise RuntimeLoadError(f"cannot read {path}: {e}; copy a valid tokenizer.json from the model") from e
        self.config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win, like transformers
            p = model_dir / name
            if p.is_file():
                self.config.update(read_json_object(p, "copy the model's tokenizer files again"))
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            text = _token_text(self.config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        extra = [_token_text(t) for t in self.config.get("additional_special_tokens") or []]
        self.additional_special_tokens = [t for t in extra if t]
        # ids `decode(..., skip_special_tokens=True)` drops wherever they stand (StreamDecoder keeps them out)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        # read once: `tokenizers` rebuilds the whole vocabulary map on every call (14 ms at 32000 entries on the CI
        # box, paid by every request's detokenizer before its prefill could start)
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` runs the post-processor (e.g. Llama's BOS), off for templated chat.

        Long texts go through `encode_batch`, which releases the GIL (`encode` holds it: seconds for megabytes,
        during which a server's event loop and engine thread would stop)."""
        if len(text) > GIL_FREE_ENCODE_CHARS:
            return list(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (not decoded text: byte-level BPE entries spell bytes as characters)."""
        return self._tok.id_to_token(int(token_id))

    def decoder_type(self) -> str | None:
        """The tokenizer.json decoder's type (ByteLevel, Sequence, ...), which says how entries map to bytes."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        return decoder.get("type")

    def template_variables(self) -> dict[str, Any]:
        """The special-token strings transformers passes into chat templates (bos_token, eos_token, ...)."""
        out: dict[str, Any] = dict(self.special_tokens)
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: `put(token_id) -> new text` (possibly ""), `flush() -> the rest`.

    Keeps `prefix` (start of the context window) and `read` (end of what was emitted). Each step decodes
    ids[prefix:read] and ids[prefix:]; the difference is new text unless it ends in an incomplete UTF-8
    sequence (U+FFFD), in which case we wait for more tokens. A token that decodes to nothing wherever it stands
    (a special token when they are skipped, an id past the vocabulary) never enters the window: decode drops it,
    so the texts are the same without it, and a run of such tokens (a model emitting reserved tokens) does not make
    every step decode a longer window.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._silent = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._vocab = tokenizer.vocab_size
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), kept until prefix or read move

    def put(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._silent or token_id >= self._vocab:
            return ""
        self.ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        prefix_text = self._prefix_text
        full_text = self._tok.decode(self.ids[self._prefix :], self._skip)
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = None
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self.ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self.ids)
        self._prefix_text = None
        return full_text[len(prefix_text) :]
