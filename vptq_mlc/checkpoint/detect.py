"""Tell a VPTQ checkpoint directory from a dense one by its config.json (cheap: reads no tensors)."""

from __future__ import annotations

import json
from pathlib import Path


def is_vptq_dir(path: Path) -> bool:
    """True when config.json declares VPTQ quantization (`quantization_config.quant_method == "vptq"`, or the
    legacy `quant_config` key)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = cfg.get("quantization_config") or {}
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "vptq" or "quant_config" in cfg
