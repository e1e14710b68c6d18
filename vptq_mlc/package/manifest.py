"""`manifest.json` of a packaged model: what each file is and its sha256, so a deploy host can pick the library for
its GPU and refuse a corrupted or mismatched one before loading it.

    {"format": "vptq-mlc-package/1", "model": ..., "model_type": ..., "quantization": ..., "vptq_mlc": ...,
     "weights": {"fingerprint": ..., "files": {name: {"sha256": ..., "size": ...}}},
     "libraries": [{"file": ..., "target": "llvm"|"cuda"|"rocm", "archs": [...], "sha256": ..., "size": ...,
                    "tvm": "0.27.0.post1", "abi": {...}, "fingerprint": ...}]}

`abi`: llvm {"machine": "x86_64"}; cuda {"cuda_runtime": "libcudart.so.13", "code": "sass"};
rocm {"code_object_version": 5, "min_rocm": "ROCm 5.2"}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vptq_mlc.artifact.checksum import sha256_file
from vptq_mlc.atomic import atomic_file
from vptq_mlc.package.config import PackageError

FORMAT = "vptq-mlc-package/1"
MANIFEST = "manifest.json"


def read_manifest(model_dir: str | os.PathLike[str], required: bool = True) -> dict[str, Any] | None:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        if required:
            raise PackageError(
                f"{path} not found; {model_dir} is not a vptq-mlc package (build one with vptq-mlc package)"
            )
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise PackageError(
            f"{path} is not valid JSON ({e}); re-download the package or re-run vptq-mlc package"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("libraries"), list):
        raise PackageError(f"{path} is not a {FORMAT} manifest; re-run vptq-mlc package with this vptq-mlc")
    return data


def write_manifest(model_dir: Path, data: dict[str, Any]) -> None:
    with atomic_file(model_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def verify_file(model_dir: Path, name: str, record: dict[str, Any], what: str = "file") -> Path:
    """The file's size and sha256 must equal the manifest's; returns its path."""
    path = Path(model_dir) / name
    if not path.is_file():
        raise PackageError(f"{what} {name} listed in {MANIFEST} is missing from {model_dir}; re-download the package")
    size = path.stat().st_size
    if size != record.get("size"):
        raise PackageError(
            f"{what} {name} has {size} bytes but {MANIFEST} says {record.get('size')}: the package is corrupted or "
            "mixed from two builds; re-download it or re-run vptq-mlc package"
        )
    digest = sha256_file(path)
    if digest != record.get("sha256"):
        raise PackageError(
            f"{what} {name} does not match {MANIFEST} (sha256 {digest[:12]}.. != {str(record.get('sha256'))[:12]}..): "
            "the file is corrupted or was replaced; re-download the package or re-run vptq-mlc package"
        )
    return path


def verify_package(model_dir: str | os.PathLike[str], weights: bool = True) -> dict[str, Any]:
    """Check every library (and weight file) against the manifest; returns the manifest."""
    model_dir = Path(model_dir)
    data = read_manifest(model_dir)
    for lib in data["libraries"]:
        verify_file(model_dir, lib["file"], lib, "library")
    if weights:
        for name, rec in data.get("weights", {}).get("files", {}).items():
            verify_file(model_dir, name, rec, "weight file")
    return data
