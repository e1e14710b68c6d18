"""The CPU's feature flags, and which of a library's required ones it lacks. No TVM import: the runtime calls this
on deploy hosts that have only TVM's runtime."""

from __future__ import annotations

import platform
from pathlib import Path


def host_cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`), or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def missing_features(needed: list[str] | tuple[str, ...], machine: str | None = None) -> list[str] | None:
    """The features of `needed` this CPU lacks ([] when it has them all; None when it cannot tell: no
    /proc/cpuinfo). A library for another machine (x86_64 vs aarch64) lacks everything it needs."""
    if machine and machine != platform.machine():
        return list(needed) or [machine]
    have = host_cpu_flags()
    if have is None:
        return None
    return [f for f in needed if f not in have]
