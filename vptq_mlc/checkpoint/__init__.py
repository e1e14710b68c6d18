"""VPTQ checkpoints: layer configs, index packing, dequantization, reading, writing (synthetic
checkpoints for tests live in vptq_mlc.testing).

Nothing else in vptq_mlc parses VPTQ tensors. Names are re-exported lazily so `import vptq_mlc.checkpoint`
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Variant": "layer_config",
    "VPTQLayerConfig": "layer_config",
    "pack_indices": "packing",
    "unpack_indices": "packing",
    "LayerCodes": "dequant",
    "decode_codes": "dequant",
    "dequantize": "dequant",
    "VPTQCheckpoint": "reader",
    "write_checkpoint": "writer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
