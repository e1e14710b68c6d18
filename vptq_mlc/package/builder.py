"""`vptq-mlc package CONFIG`: models x targets -> `dist/<model>/` with the weights once, one library per target
(per arch for ROCm) named `<model>-<quantization>-<target>[-<arch>].so`, and `manifest.json`.

Incremental: each output records a fingerprint of its inputs (source files' names/sizes/mtimes, convert options,
the vptq-mlc code that produces it, TVM version, target); an output whose fingerprint and file hash still match
is kept, anything else is rebuilt, and libraries of targets no longer in the config are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vptq_mlc.artifact.checksum import SIDECAR_SUFFIX, sidecar_path, write_sidecar
from vptq_mlc.artifact.files import CHAT_CONFIG, TENSOR_CACHE
from vptq_mlc.package.config import ModelEntry, PackageConfig, PackageError
from vptq_mlc.package.manifest import FORMAT, read_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)
_PKG_ROOT = Path(__file__).resolve().parents[1]
_SKIP_SOURCE = {"manifest.json"}


def _is_library_file(p: Path) -> bool:
    """A model library or its checksum sidecar: built per target by the package, never copied as weights."""
    return p.suffix == ".so" or p.name.endswith(".so" + SIDECAR_SUFFIX)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _code_hash(*subpackages: str, root: Path = _PKG_ROOT) -> str:
    """Hash of the vptq-mlc sources that produce an output, so code changes trigger a rebuild."""
    h = hashlib.sha256()
    for sub in subpackages:
        for p in sorted((root / sub).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _source_fingerprint(src: Path) -> list:
    if not src.exists():
        raise PackageError(f"model source {src} not found; fix \"source\" in the package config")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    return [(str(p.relative_to(src) if p != src else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files if p.name not in _SKIP_SOURCE and not _is_library_file(p)]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _is_mlc_dir(src: Path) -> bool:
    return src.is_dir() and (src / CHAT_CONFIG).exists() and (src / TENSOR_CACHE).exists()


def _stage_weights(entry: ModelEntry, work: Path) -> Path:
    """Convert (or copy an MLC dir) into `work`; returns the folder holding the weight files."""
    if _is_mlc_dir(entry.source):
        work.mkdir(parents=True)
        for p in sorted(entry.source.iterdir()):
            if p.is_file() and not _is_library_file(p) and p.name not in _SKIP_SOURCE:
                shutil.copy2(p, work / p.name)
        return work
    from vptq_mlc.convert.converter import convert_checkpoint

    return convert_checkpoint(entry.source, work, **entry.convert)


def _check_archs(bt: Any, path: Path) -> None:
    """The library must hold code for exactly the archs the manifest will claim (as far as the backend can read)."""
    found = bt.library_archs(path)
    if found is not None and sorted(found) != sorted(bt.archs):
        raise PackageError(f"{path.name} holds code for {found}, not the requested {list(bt.archs)}; rebuild it")


class PackageBuilder:
    """Builds one package config; `build()` returns the model directories."""

    def __init__(self, config: PackageConfig, output: Path | None = None, force: bool = False):
        self.config = config
        self.output = Path(output) if output else config.output
        self.force = force
        self.rebuilt: list[str] = []  # what this run (re)built, for logs and tests

    def build(self) -> list[Path]:
        from vptq_mlc.compile.targets import resolve_backend

        plans = []
        for entry in self.config.models:
            bts = [bt for spec in entry.targets for bt in resolve_backend(spec.kind, spec.archs)]
            plans.append((entry, bts))
        total = sum(1 + len(bts) for _, bts in plans)
        self.output.mkdir(parents=True, exist_ok=True)
        out_dirs = []
        with tqdm(total=total, desc="package", unit="step", disable=None) as bar:
            for entry, bts in plans:
                out_dirs.append(self._build_model(entry, bts, bar))
        return out_dirs

    def _build_model(self, entry: ModelEntry, bts: list, bar: tqdm) -> Path:
        model_dir = self.output / entry.name
        old = read_manifest(model_dir, required=False) if model_dir.exists() else None
        weights_fp = _digest({
            "source": _source_fingerprint(entry.source), "convert": entry.convert, "vptq_mlc": _version("vptq-mlc"),
            "code": _code_hash("convert", "artifact", "checkpoint"),
        })
        bar.set_postfix_str(f"{entry.name}: weights")
        weights = self._weights(entry, model_dir, old, weights_fp)
        bar.update(1)

        from vptq_mlc.artifact.chat_config import ChatConfig

        chat = ChatConfig.load(model_dir)
        quant = str(chat.quantization or "q").replace("/", "_")
        manifest: dict[str, Any] = {
            "format": FORMAT, "model": entry.name, "model_type": chat.model_type or None, "quantization": quant,
            "vptq_mlc": _version("vptq-mlc"), "weights": weights, "libraries": [],
        }
        old_libs = {lib["file"]: lib for lib in (old or {}).get("libraries", [])}
        lib_code = _code_hash("model", "tir_kernels", "artifact", "compile")
        tvm_version = _version("apache-tvm")
        for bt in bts:
            name = f"{entry.name}-{quant}-{bt.label}.so"
            bar.set_postfix_str(f"{entry.name}: {bt.label}")
            fp = _digest({"weights": weights_fp, "chat": chat, "target": str(bt.target), "archs": bt.archs,
                          "tvm": tvm_version, "code": lib_code})
            path = model_dir / name
            prev = old_libs.get(name)
            if (not self.force and prev and prev.get("fingerprint") == fp and path.is_file()
                    and prev.get("size") == path.stat().st_size and sha256_file(path) == prev.get("sha256")):
                record = prev
                write_sidecar(path, prev["sha256"])  # just verified; also gives older packages their sidecar
            else:
                from vptq_mlc.compile.build import build_library

                build_library(model_dir, bt, path)
                _check_archs(bt, path)
                record = {"file": name, "target": bt.kind, "archs": list(bt.archs), "sha256": sha256_file(path),
                          "size": path.stat().st_size, "tvm": tvm_version, "abi": bt.abi(),
                          "fingerprint": fp}
                self.rebuilt.append(name)
            manifest["libraries"].append(record)
            write_manifest(model_dir, {**manifest, "libraries": manifest["libraries"] + [
                lib for f, lib in old_libs.items() if f not in {r["file"] for r in manifest["libraries"]}
                and (model_dir / f).exists()]})  # progress survives an interrupted run
            bar.update(1)
        keep = {lib["file"] for lib in manifest["libraries"]}
        for f in old_libs:
            if f not in keep:
                (model_dir / f).unlink(missing_ok=True)
                sidecar_path(model_dir / f).unlink(missing_ok=True)
                log.info("removed %s (its target is no longer in the config)", f)
        write_manifest(model_dir, manifest)
        return model_dir

    def _weights(self, entry: ModelEntry, model_dir: Path, old: dict | None, fp: str) -> dict[str, Any]:
        prev = (old or {}).get("weights", {})
        if (not self.force and prev.get("fingerprint") == fp and prev.get("files")
                and all((model_dir / n).is_file() and (model_dir / n).stat().st_size == r["size"]
                        for n, r in prev["files"].items())):
            return prev
        work = self.output / f".{entry.name}.weights-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            staged = _stage_weights(entry, work)
            model_dir.mkdir(parents=True, exist_ok=True)
            files = {}
            for p in sorted(staged.iterdir()):
                if p.is_file():
                    files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
                    os.replace(p, model_dir / p.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for name in prev.get("files", {}):
            if name not in files:
                (model_dir / name).unlink(missing_ok=True)
        self.rebuilt.append(f"{entry.name}:weights")
        return {"fingerprint": fp, "files": files}


def build_package(config: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                  force: bool = False) -> list[Path]:
    """Build every model x target of the config; returns the packaged model directories."""
    return PackageBuilder(PackageConfig.load(config), Path(output) if output else None, force).build()
