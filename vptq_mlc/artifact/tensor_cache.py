"""MLC-LLM's weight format: `tensor-cache.json` + `params_shard_<N>.bin` (docs/mlc-artifacts.md section 3): the
streaming writer convert uses and the index reader compile and the runtime use.

Our own streaming writer rather than `tvm.contrib.tvmjs.dump_tensor_cache`: it never holds more than one
shard in memory, stores every dtype `raw` (float32 stays exact) and reports progress through tqdm, not stdout.
Shards are filled in order and a tensor never straddles two shards, which TVM's reader requires.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vptq_mlc.artifact.files import SHARD_PREFIX, TENSOR_CACHE

SHARD_CAP_BYTES = 32 * 2**20


class TensorCacheWriter:
    """Append tensors one at a time; `close()` writes the index. Use as a context manager."""

    def __init__(self, out_dir: Path, shard_cap_bytes: int = SHARD_CAP_BYTES, metadata: dict[str, Any] | None = None):
        self.out_dir, self.cap = Path(out_dir), shard_cap_bytes
        self.metadata = dict(metadata or {})
        self.shards: list[dict[str, Any]] = []
        self._pending: list[tuple[dict[str, Any], bytes]] = []
        self._pending_bytes = 0
        self.total_bytes = 0
        self.num_tensors = 0

    def add(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        data = a.tobytes()
        if self._pending and self._pending_bytes + len(data) > self.cap:
            self._flush()
        rec = {"name": name, "shape": list(a.shape), "dtype": str(a.dtype), "format": "raw", "nbytes": len(data)}
        self._pending.append((rec, data))
        self._pending_bytes += len(data)
        self.total_bytes += len(data)
        self.num_tensors += 1

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f"{SHARD_PREFIX}{len(self.shards)}.bin"
        md5, offset, records = hashlib.md5(), 0, []
        with open(path, "wb") as f:
            for rec, data in self._pending:
                f.write(data)
                md5.update(data)
                records.append({**rec, "byteOffset": offset})
                offset += len(data)
        self.shards.append(
            {"dataPath": path.name, "format": "raw-shard", "nbytes": offset, "records": records,
             "md5sum": md5.hexdigest()}
        )
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        self._flush()
        meta = {"ParamSize": self.num_tensors, "ParamBytes": self.total_bytes, **self.metadata}
        (self.out_dir / TENSOR_CACHE).write_text(json.dumps({"metadata": meta, "records": self.shards}, indent=2))

    def __enter__(self) -> TensorCacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()


def read_index(model_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> record (shape, dtype, ..., plus its shard's `dataPath`) of every tensor in a model dir's tensor
    cache (numpy + json only: the runtime uses it too)."""
    index = json.loads((Path(model_dir) / TENSOR_CACHE).read_text())
    return {rec["name"]: {**rec, "dataPath": shard["dataPath"]}
            for shard in index["records"] for rec in shard["records"]}


def shard_paths(model_dir: Path) -> list[str]:
    """The shard files the index names (relative to the model dir)."""
    return [shard["dataPath"] for shard in json.loads((Path(model_dir) / TENSOR_CACHE).read_text())["records"]]


def write_tensor_cache(out_dir: Path, tensors: Iterable[tuple[str, np.ndarray]], **kw: Any) -> None:
    with TensorCacheWriter(out_dir, **kw) as w:
        for name, a in tensors:
            w.add(name, a)
