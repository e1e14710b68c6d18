"""Writing a VPTQ checkpoint in the exact VPTQ-community layout (vptq-format.md sections 1, 2, 6).

config.json carries `quantization_config = {quant_method: "vptq", config_for_layers: {...}}` and `torch_dtype`;
weights go to `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` when
they exceed `max_shard_bytes`. Safetensors files are serialized here (the format is a JSON header plus raw
little-endian bytes) so that tensors stream to disk one at a time and bf16 can be written without torch.
The directory is built under a temp sibling and renamed at the end, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vptq_mlc.atomic import atomic_dir
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.schema import FLOAT, NP_TO_ST, expected_tensors, f32_to_bf16_bits
from vptq_mlc.errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def _st_tag(a: np.ndarray, bf16: bool) -> str:
    if bf16 and a.dtype.kind == "f":
        return "BF16"
    name = np.dtype(a.dtype).name
    if name not in NP_TO_ST:
        raise CheckpointError(f"cannot store dtype {name} in safetensors; convert the tensor first")
    return NP_TO_ST[name]


def _to_bytes(a: np.ndarray, tag: str) -> bytes:
    if tag == "BF16":
        return f32_to_bf16_bits(a).astype("<u2").tobytes()
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def write_safetensors(path: Path, tensors: Iterable[tuple[str, np.ndarray]], *, bf16: bool = False) -> int:
    """Write one safetensors file (metadata `format: pt`, which transformers requires); returns data bytes.

    With `bf16`, float tensors are rounded to bfloat16 (nearest even) on the way out.
    """
    items = [(n, np.asarray(a)) for n, a in tensors]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, a in items:
        tag = _st_tag(a, bf16)
        nbytes = a.size * (2 if tag == "BF16" else a.dtype.itemsize)
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, a in items:
            f.write(_to_bytes(a, header[name]["dtype"]))
    return off


def _check_layer(path: str, cfg: VPTQLayerConfig, tensors: Mapping[str, np.ndarray]) -> None:
    spec = expected_tensors(cfg)
    extra = sorted(set(tensors) - set(spec))
    if extra:
        raise CheckpointError(f"layer {path}: unexpected tensors {extra} for its config; drop them or fix the config")
    for name, s in spec.items():
        if name not in tensors:
            raise CheckpointError(f"layer {path}: tensor {name!r} missing (expected {s.describe()})")
        a = np.asarray(tensors[name])
        ok_dtype = a.dtype.kind == "f" if s.dtypes == (FLOAT,) else np.dtype(a.dtype).name in s.dtypes
        if tuple(a.shape) != s.shape or not ok_dtype:
            raise CheckpointError(
                f"layer {path}: tensor {name!r} expected {s.describe()}, found {a.dtype} {list(a.shape)}"
            )


def _float_dtype_name(arrays: Iterable[np.ndarray]) -> str:
    for a in arrays:
        if a.dtype.kind == "f":
            return np.dtype(a.dtype).name
    return "float16"


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    hf_config: Mapping[str, Any],
    dense: Mapping[str, np.ndarray],
    layers: Mapping[str, tuple[VPTQLayerConfig, Mapping[str, np.ndarray]]],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a VPTQ checkpoint directory; returns its path.

    `dense`: full HF tensor names -> arrays; `layers`: module path -> (config, {short name: array}), stored as
    `<path>.<short name>`. `dtype="bfloat16"` stores float tensors as bf16 (from any float input); otherwise
    arrays are stored as given and `torch_dtype` defaults to their float dtype. `overwrite` replaces an existing
    directory (the old one is removed only after the new one is complete).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists; choose another output directory or pass overwrite")
    named: list[tuple[str, np.ndarray]] = []
    qcfg: dict[str, Any] = {}
    for path, (cfg, tensors) in layers.items():
        _check_layer(path, cfg, tensors)
        qcfg[path] = cfg.to_json()
        named += [(f"{path}.{n}", np.asarray(tensors[n])) for n in expected_tensors(cfg)]
    for name, a in dense.items():
        if any(name.startswith(p + ".") for p in layers):
            raise CheckpointError(f"dense tensor {name} belongs to quantized layer; pass it in the layer's tensors")
        named.append((name, np.asarray(a)))
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise CheckpointError(f"tensor {name} given twice")
        seen.add(name)

    bf16 = dtype == "bfloat16"
    if dtype is not None and not bf16:
        named = [(n, a.astype(dtype) if a.dtype.kind == "f" else a) for n, a in named]
    config = copy.deepcopy(dict(hf_config))
    config.pop("quant_config", None)
    qc = dict(config.get("quantization_config") or {})
    qc.update({"quant_method": "vptq", "config_for_layers": qcfg})
    qc.pop("shared_layer_config", None)
    config["quantization_config"] = qc
    config["torch_dtype"] = dtype or config.get("torch_dtype") or _float_dtype_name(a for _, a in named)

    # shard in the given order, like transformers (a shard may exceed the limit only for a single huge tensor)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for n, a in named:
        nb = a.size * (2 if bf16 and a.dtype.kind == "f" else a.dtype.itemsize)
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((n, a))
        size += nb

    with atomic_dir(out) as tmp:
        total = 0
        if len(shards) == 1:
            total += write_safetensors(tmp / "model.safetensors", shards[0], bf16=bf16)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(tmp / fname, shard, bf16=bf16)
                weight_map.update({n: fname for n, _ in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            tdir = Path(tokenizer_dir)
            found = [tdir / f for f in TOKENIZER_FILE_NAMES if (tdir / f).is_file()]
            if not found:
                raise CheckpointError(f"no tokenizer files in {tdir}; expected tokenizer.json or tokenizer.model")
            for f in found:
                shutil.copy2(f, tmp / f.name)
    log.info("wrote %s (%d tensors, %d shard(s), %.1f MB)", out, len(named), len(shards), total / 1e6)
    return out
