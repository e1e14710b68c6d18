"""Structured output (JSON, JSON schema, tool calls) through xgrammar's grammar matcher.

Why xgrammar's native binding and not its Python package: `import xgrammar` (0.2.8) imports torch and
transformers at module load, and neither may be a dependency of a deploy host. The matcher itself is C++
behind tvm-ffi (the same FFI library TVM's runtime uses), so we load `xgrammar.tvm_ffi_binding` without running
the package's `__init__` and drive it with numpy bitmasks. The wheel is pinned (`structured` extra): the binding
names are xgrammar's internals.

One `GrammarFactory` per served model holds the tokenizer description and a compiler (with its grammar cache);
each request gets its own `GrammarConstraint` (a matcher), which the engine's sampler asks for the allowed
tokens at every step, so structured and free requests share a batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np

from vptq_mlc.errors import GenerationError
from vptq_mlc.runtime.frontend import RequestFrontend

XGRAMMAR_VERSION = "0.2.8"
MISSING = ('structured output needs xgrammar: pip install "vptq-mlc[structured]" '
           f"(or pip install --no-deps xgrammar=={XGRAMMAR_VERSION})")

_api_lock = threading.Lock()
_api: Any = None


class StructuredOutputUnavailable(GenerationError):
    """xgrammar is not installed (or is a version whose binding we do not know)."""


def xgrammar_api() -> Any:
    """xgrammar's FFI classes (TokenizerInfo, GrammarCompiler, GrammarMatcher), loaded once, without torch."""
    global _api
    with _api_lock:
        if _api is not None:
            return _api
        spec = importlib.util.find_spec("xgrammar")
        if spec is None or not spec.submodule_search_locations:
            raise StructuredOutputUnavailable(MISSING)
        if "xgrammar.tvm_ffi_binding._ffi_api" in sys.modules:  # the full package is already imported
            _api = sys.modules["xgrammar.tvm_ffi_binding._ffi_api"]
            return _api
        real = sys.modules.get("xgrammar")
        shell = types.ModuleType("xgrammar")  # a bare package: its __init__ would import torch
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__package__ = "xgrammar"
        sys.modules["xgrammar"] = shell
        try:
            importlib.import_module("xgrammar.load_binding")  # loads libxgrammar_bindings.so through tvm_ffi
            api = importlib.import_module("xgrammar.tvm_ffi_binding._ffi_api")
        except Exception as e:  # noqa: BLE001 - a broken or different install: one line, the fix
            raise StructuredOutputUnavailable(f"xgrammar could not be loaded ({type(e).__name__}: {e}); "
                                              f"install xgrammar=={XGRAMMAR_VERSION}") from e
        finally:
            if real is None:
                sys.modules.pop("xgrammar", None)  # a later `import xgrammar` runs the real package
            else:
                sys.modules["xgrammar"] = real
        if not all(hasattr(api, n) for n in ("TokenizerInfo", "GrammarCompiler", "GrammarMatcher")):
            raise StructuredOutputUnavailable(
                f"this xgrammar has an unknown binding; install xgrammar=={XGRAMMAR_VERSION}")
        _api = api
        return api


class GrammarConstraint:
    """One request's grammar state (`runtime.sampling.TokenConstraint`): allowed tokens, advance, done."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self._from_dlpack = importlib.import_module("tvm_ffi").from_dlpack

    def fill_bitmask(self, bitmask: np.ndarray) -> None:
        self._matcher.fill_next_token_bitmask(self._from_dlpack(bitmask), 0, False)

    def accept(self, token: int) -> None:
        if not self._matcher.is_terminated() and not self._matcher.accept_token(int(token), False):
            raise GenerationError(f"token {token} does not match the grammar (the sampler must apply the bitmask)")

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GrammarFactory:
    """Compiles grammars for one tokenizer (cached by xgrammar) and makes a matcher per request.

    Thread-safe: handlers compile in a thread pool; each matcher is then used by the engine loop only."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        from tokenizers import Tokenizer

        api = xgrammar_api()
        self._api = api
        vocab = Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)
        encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
        for token, i in vocab.items():
            encoded[i] = token
        meta = json.loads(api.TokenizerInfo._detect_metadata_from_hf(tokenizer_json))
        info = api.TokenizerInfo(encoded, int(meta["vocab_type"]), vocab_size, list(stop_token_ids) or None,
                                 bool(meta["add_prefix_space"]))
        self._compiler = api.GrammarCompiler(info, 2, True, -1)

    @classmethod
    def for_model(cls, frontend: RequestFrontend) -> GrammarFactory:
        """From the served model's tokenizer.json; the bitmask covers the logits the sampler sees."""
        path = Path(frontend.model_dir) / "tokenizer.json"
        return cls(path.read_text(), int(frontend.active_vocab or frontend.vocab_size),
                   sorted(frontend.eos_token_ids))

    def json_object(self) -> Any:
        """Any JSON object (OpenAI's json_object mode: the top level is an object)."""
        return self.json_schema({"type": "object"})

    def json_schema(self, schema: dict[str, Any], strict: bool = True) -> Any:
        """A compiled grammar for `schema`: compact JSON (no free whitespace, which a model could repeat forever)."""
        try:
            return self._compiler.compile_json_schema(json.dumps(schema), False, None, None, strict, None, False)
        except Exception as e:  # noqa: BLE001 - xgrammar raises on schemas it cannot turn into a grammar
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GenerationError(f"the JSON schema cannot be used: {message}; fix the schema") from e

    def constraint(self, compiled: Any) -> GrammarConstraint:
        return GrammarConstraint(self._api.GrammarMatcher(compiled, None, False, -1, None))
