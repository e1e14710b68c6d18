"""The package config (`vptq-mlc package CONFIG`): which models to ship for which targets.

JSON (or TOML on Python >= 3.11), like MLC-LLM's mlc-package-config.json:

    {
      "output": "dist",
      "models": [
        {"name": "llama-7b-vptq", "source": "ckpt/Llama-2-7b-v8-k65536-256",
         "targets": ["llvm:x86-64-v3,x86-64-v4", "cuda:sm_80,sm_86,sm_89,sm_90", "rocm:gfx90a,gfx942,gfx1100"],
         "convert": {"dtype": "float16", "context_window_size": 4096}}
      ]
    }

`source` is a VPTQ checkpoint (converted here) or an already converted MLC model directory. Relative paths are
relative to the config file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vptq_mlc.errors import VPTQMLCError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CONVERT_KEYS = ("dtype", "context_window_size", "prefill_chunk_size", "max_batch_size")
TARGET_KINDS = ("llvm", "cuda", "rocm")


class PackageError(VPTQMLCError):
    """A package config, package directory or manifest is invalid, or no packaged library fits this host."""


@dataclass(frozen=True)
class TargetSpec:
    """`llvm` (this host's CPU), `llvm:x86-64-v3,x86-64-v4,aarch64`, `cuda:sm_80,sm_90` or `rocm:gfx90a,gfx1100`."""

    kind: str
    archs: str | None = None

    @classmethod
    def parse(cls, text: str) -> TargetSpec:
        kind, _, archs = text.strip().partition(":")
        kind = {"cpu": "llvm"}.get(kind.lower(), kind.lower())
        if kind not in TARGET_KINDS:
            raise PackageError(
                f"unknown target {text!r} in the package config; use llvm, cuda:sm_XX,.. or rocm:gfxXXX,.."
            )
        return cls(kind, archs or None)

    def __str__(self) -> str:
        return f"{self.kind}:{self.archs}" if self.archs else self.kind


@dataclass
class ModelEntry:
    name: str
    source: Path
    targets: list[TargetSpec]
    convert: dict[str, Any] = field(default_factory=dict)


@dataclass
class PackageConfig:
    output: Path
    models: list[ModelEntry]

    @classmethod
    def load(cls, path: str | Path) -> PackageConfig:
        path = Path(path)
        if not path.is_file():
            raise PackageError(f"package config {path} not found; write one (see `vptq-mlc package --help`)")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                raw = tomllib.loads(text)
            else:
                raw = json.loads(text)
        except (ValueError, ImportError) as e:
            raise PackageError(f"cannot parse {path}: {e}; fix the {path.suffix or 'JSON'} syntax") from None
        return cls.from_dict(raw, path.parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path) -> PackageConfig:
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
            raise PackageError("package config needs a non-empty \"models\" list")
        models, names = [], set()
        for i, m in enumerate(raw["models"]):
            where = f"models[{i}]"
            if not isinstance(m, dict) or "name" not in m or "source" not in m or "targets" not in m:
                raise PackageError(f"{where} needs \"name\", \"source\" and \"targets\"")
            name = str(m["name"])
            if not _NAME_RE.match(name):
                raise PackageError(f"{where}: model name {name!r} may use letters, digits, '.', '_', '-' only")
            if name in names:
                raise PackageError(f"{where}: model name {name!r} appears twice")
            names.add(name)
            targets = [TargetSpec.parse(t) for t in (m["targets"] if isinstance(m["targets"], list) else [])]
            if not targets:
                raise PackageError(f"{where} ({name}): \"targets\" must be a non-empty list like [\"llvm\"]")
            kinds = [t.kind for t in targets]
            dup = sorted({k for k in kinds if kinds.count(k) > 1})
            if dup:
                raise PackageError(f"{where} ({name}): target {dup[0]} listed twice; merge the arch lists")
            conv = dict(m.get("convert") or {})
            bad = sorted(set(conv) - set(CONVERT_KEYS))
            if bad:
                raise PackageError(
                    f"{where} ({name}): unknown convert option {bad[0]!r}; use {', '.join(CONVERT_KEYS)}"
                )
            src = Path(m["source"]).expanduser()
            models.append(ModelEntry(name, src if src.is_absolute() else (base / src), targets, conv))
        out = Path(raw.get("output", "dist")).expanduser()
        return cls(out if out.is_absolute() else base / out, models)
