"""The one cache root: imported models, Hessians, the bundled model's stages, build-time stubs and kernels."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VPTQ_MLC_CACHE"


def cache_root() -> Path:
    """$VPTQ_MLC_CACHE, else $XDG_CACHE_HOME/vptq-mlc, else ~/.cache/vptq-mlc (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vptq-mlc"
