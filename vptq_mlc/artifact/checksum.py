"""The `<file>.sha256` sidecar of a model library: its sha256 recorded when it was written, checked before loading.

A library whose bytes were overwritten in place keeps a valid ELF structure, so only running its code would find the
damage (SIGSEGV / SIGILL). The sidecar uses sha256sum's format (`<hex>  <name>`), so `sha256sum -c lib.so.sha256`
checks the same thing by hand.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from vptq_mlc.atomic import atomic_file

SIDECAR_SUFFIX = ".sha256"
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: Path, digest: str | None = None) -> Path:
    """Write `<path>.sha256` atomically (after `path` itself is complete); `digest` if already known."""
    path = Path(path)
    digest = digest or sha256_file(path)
    side = sidecar_path(path)
    with atomic_file(side) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")
    return side


def read_sidecar(path: Path) -> str | None:
    """The sha256 hex recorded for `path`, None when it has no sidecar; ValueError for a sidecar that is not in
    sha256sum's format."""
    side = sidecar_path(Path(path))
    try:
        text = side.read_text(errors="replace")
    except FileNotFoundError:
        return None
    m = _LINE.fullmatch(text.strip().splitlines()[0] if text.strip() else "")
    if m is None:
        raise ValueError(f"{side} is not a sha256sum line (`<64 hex digits>  <file name>`)")
    return m.group(1).lower()
