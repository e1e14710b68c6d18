"""MLC-LLM's weight format: `tensor-cache.json` + `params_shard_<N>.bin` (docs/mlc-artifacts.md section 3): the
streaming writer convert uses and the index reader compile and the runtime use.

Our own streaming writer rather than `tvm.contrib.tvmjs.dump_tensor_cache`: it never holds more than one
shard in memory, stores every dtype `raw` (float32 stays exact) and reports progress through tqdm, not stdout.
Shards are filled in order and a tensor never straddles two shards, which TVM's reader requires.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from vptq_mlc.artifact.files import SHARD_PREFIX, TENSOR_CACHE
from vptq_mlc.errors import ModelDirError

SHARD_CAP_BYTES = 32 * 2**20


class TensorCacheWriter:
    """Append tensors one at a time; `close()` writes the index. Use as a context manager."""

    def __init__(self, out_dir: Path, shard_cap_bytes: int = SHARD_CAP_BYTES, metadata: dict[str, Any] | None = None,
                 first_shard: int = 0):
        """`first_shard`: number of the first shard file written (appending to an existing cache: `append_tensors`)."""
        self.out_dir, self.cap = Path(out_dir), shard_cap_bytes
        self.first_shard = first_shard
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
        path = self.out_dir / f"{SHARD_PREFIX}{self.first_shard + len(self.shards)}.bin"
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


def append_tensors(model_dir: Path, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Add tensors to an existing tensor cache as new shards; returns the bytes added.

    The new shards are written first under names the index does not use yet, then tensor-cache.json is replaced in
    one rename: an interruption leaves the old cache intact (plus an unreferenced shard the next attempt
    overwrites)."""
    from vptq_mlc.atomic import atomic_file

    model_dir = Path(model_dir)
    index = load_index_json(model_dir)
    stored = check_index(model_dir, index)
    used = {shard["dataPath"] for shard in index["records"]}
    first = len(index["records"])
    while f"{SHARD_PREFIX}{first}.bin" in used:
        first += 1
    writer = TensorCacheWriter(model_dir, first_shard=first)
    for name, a in tensors:
        if name in stored:
            raise ModelDirError(f"tensor {name} is already in {model_dir / TENSOR_CACHE}")
        writer.add(name, a)
    writer._flush()
    meta = dict(index.get("metadata") or {})
    meta["ParamSize"] = int(meta.get("ParamSize", len(stored))) + writer.num_tensors
    meta["ParamBytes"] = int(meta.get("ParamBytes", 0)) + writer.total_bytes
    with atomic_file(model_dir / TENSOR_CACHE) as tmp:
        tmp.write_text(json.dumps({**index, "metadata": meta, "records": index["records"] + writer.shards}, indent=2))
    return writer.total_bytes


def read_tensor(model_dir: Path, rec: dict[str, Any]) -> np.ndarray:
    """One raw tensor of a checked record (`read_index`) as a numpy array copied out of its shard."""
    if rec.get("format", "raw") != "raw" or rec["dtype"] == "bfloat16":
        raise ModelDirError(f"tensor {rec['name']} is stored as {rec['dtype']}/{rec.get('format')}; re-run convert")
    with open(Path(model_dir) / rec["dataPath"], "rb") as f:
        f.seek(rec["byteOffset"])
        data = f.read(rec["nbytes"])
    return np.frombuffer(data, dtype=rec["dtype"]).reshape(rec["shape"])


def read_index(model_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> record (shape, dtype, ..., plus its shard's `dataPath`) of every tensor in a model dir's tensor
    cache (numpy + json only: the runtime uses it too). Every record is checked against its shard first
    (`check_index`), so TVM's loader, which trusts offsets and paths, never sees a record that points outside."""
    model_dir = Path(model_dir)
    return check_index(model_dir, load_index_json(model_dir))


def shard_paths(model_dir: Path) -> list[str]:
    """The shard files the index names (relative to the model dir), after the same checks as `read_index`."""
    model_dir = Path(model_dir)
    index = load_index_json(model_dir)
    check_index(model_dir, index)
    return [shard["dataPath"] for shard in index["records"]]


# ---- checks of a tensor cache read from disk (a model dir may come from anywhere) ----

RECORD_FORMATS = ("raw", "f32-to-bf16")
SHARD_FORMAT = "raw-shard"
_BYTES_PER_ELEMENT = {"bfloat16": 2, "bool": 1}
_RECONVERT = "re-run `vptq-mlc convert`"


def _bad(model_dir: Path, what: str) -> ModelDirError:
    return ModelDirError(f"{Path(model_dir) / TENSOR_CACHE} is invalid: {what}; {_RECONVERT}")


def load_index_json(model_dir: Path) -> dict[str, Any]:
    """The parsed tensor-cache.json, which must be a JSON object (other checks: `check_index`)."""
    path = Path(model_dir) / TENSOR_CACHE
    if not path.is_file():
        raise ModelDirError(f"no {TENSOR_CACHE} in {model_dir}; run `vptq-mlc convert` to write the weights")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {_RECONVERT}") from None
    if not isinstance(index, dict) or not isinstance(index.get("records"), list):
        raise _bad(model_dir, 'expected an object with a "records" list of shards')
    return index


def element_bytes(dtype: str) -> int:
    """Bytes per element of a tensor-cache dtype name (ValueError for names that are not a number type)."""
    if dtype in _BYTES_PER_ELEMENT:
        return _BYTES_PER_ELEMENT[dtype]
    np_dtype = np.dtype(dtype)
    if np_dtype.kind not in "fiu":
        raise ValueError(dtype)
    return np_dtype.itemsize


def stored_nbytes(rec: dict[str, Any]) -> int:
    """Bytes a record's data takes in its shard: float32 stored as bf16 (`f32-to-bf16`) takes 2 per element."""
    count = int(np.prod(rec["shape"], dtype=np.int64))
    if rec["format"] == "f32-to-bf16" and rec["dtype"] == "float32":
        return 2 * count
    return count * element_bytes(rec["dtype"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_data_path(model_dir: Path, data_path: Any) -> Path:
    """The shard file a `dataPath` names, refused unless it is a relative path inside the model dir.

    Checked on the string, before anything is opened: no absolute paths, no `..`, no NUL. Symbolic links inside
    the dir are followed (a Hugging Face cache snapshot links every file into its blob store)."""
    if not isinstance(data_path, str) or not data_path or "\0" in data_path:
        raise _bad(model_dir, f"shard dataPath {data_path!r} is not a file name")
    pure = PurePosixPath(data_path)
    if pure.is_absolute() or PureWindowsPath(data_path).is_absolute() or ".." in pure.parts or "\\" in data_path:
        raise _bad(model_dir, f"shard dataPath {data_path!r} points outside the model directory")
    return Path(model_dir) / pure


def check_record(model_dir: Path, shard_name: str, shard_bytes: int, rec: Any) -> dict[str, Any]:
    """One tensor record: types, a known dtype and format, `nbytes` = what shape and dtype need, inside the shard."""
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise _bad(model_dir, f"a record of {shard_name} is not an object with a string name")
    name = rec["name"]
    shape, offset, nbytes = rec.get("shape"), rec.get("byteOffset"), rec.get("nbytes")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad(model_dir, f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not _is_int(offset) or not _is_int(nbytes) or offset < 0 or nbytes < 0:
        raise _bad(model_dir, f"tensor {name}: byteOffset {offset!r} / nbytes {nbytes!r} must be integers >= 0")
    if rec.get("format", "raw") not in RECORD_FORMATS:
        raise _bad(model_dir, f"tensor {name}: format {rec.get('format')!r} is not one of {', '.join(RECORD_FORMATS)}")
    try:
        need = stored_nbytes({**rec, "format": rec.get("format", "raw")})
    except (TypeError, ValueError):
        raise _bad(model_dir, f"tensor {name}: unknown dtype {rec.get('dtype')!r}") from None
    if nbytes != need:
        raise _bad(model_dir, f"tensor {name}: nbytes {nbytes} but {rec['dtype']}{shape} takes {need} bytes")
    if offset + nbytes > shard_bytes:
        raise _bad(model_dir, f"tensor {name}: bytes {offset}..{offset + nbytes} lie past the end of {shard_name} "
                              f"({shard_bytes} bytes)")
    return rec


def check_index(model_dir: Path, index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> record (plus `dataPath`) after checking every shard and record against the files on disk.

    What TVM's loader would otherwise trust: shard paths stay inside the model dir, each shard's size is the
    file's size, every record lies inside its shard with `nbytes` matching dtype and shape, records of one shard
    do not overlap and names are unique. Raises a one-line ModelDirError naming the first problem."""
    model_dir = Path(model_dir)
    out: dict[str, dict[str, Any]] = {}
    for shard in index["records"]:
        if not isinstance(shard, dict) or not isinstance(shard.get("records"), list):
            raise _bad(model_dir, 'a shard entry is not an object with a "records" list')
        file = check_data_path(model_dir, shard.get("dataPath"))
        name = shard["dataPath"]
        if shard.get("format", SHARD_FORMAT) != SHARD_FORMAT or not _is_int(shard.get("nbytes")):
            raise _bad(model_dir, f"shard {name}: expected format {SHARD_FORMAT!r} and an integer nbytes")
        if not file.is_file():
            raise ModelDirError(f"weight shard {name} missing in {model_dir}; {_RECONVERT}")
        size = file.stat().st_size
        if size != shard["nbytes"]:
            raise ModelDirError(f"weight shard {name} is {size} bytes but {TENSOR_CACHE} says {shard['nbytes']}: "
                               f"truncated or from another conversion; {_RECONVERT}")
        spans = []
        for rec in shard["records"]:
            rec = check_record(model_dir, name, size, rec)
            if rec["name"] in out:
                raise _bad(model_dir, f"tensor {rec['name']} is listed twice")
            out[rec["name"]] = {**rec, "dataPath": name}
            spans.append((rec["byteOffset"], rec["byteOffset"] + rec["nbytes"], rec["name"]))
        spans.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            if start < end:
                raise _bad(model_dir, f"tensors {first} and {second} overlap in {name}")
    return out


def write_tensor_cache(out_dir: Path, tensors: Iterable[tuple[str, np.ndarray]], **kw: Any) -> None:
    with TensorCacheWriter(out_dir, **kw) as w:
        for name, a in tensors:
            w.add(name, a)
