"""A required reference that is missing fails the test in CI and skips it (with the reason) elsewhere.

CI is `CI=true` in the environment (`.ci/run` sets it, as do GitHub Actions and most CI services): there every
reference the suite checks against (microsoft's `vptq`, the data packages, nvcc, ...) was installed by the same
script, so one that is missing is a broken install, not a reason to check less. On a developer's machine a skip
with the install hint is more useful than a failure.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

# What `.ci/run` recorded about its apt-get step for the ROCm toolchain: "ok", "failed" (apt itself failed: the
# tests may skip) or "unavailable" (not root / no apt-get). Unset: not run by `.ci/run`.
ROCM_APT_ENV = "VPTQ_MLC_ROCM_APT"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """Fail (CI) or skip (elsewhere) because the reference named in `reason` is not installed."""
    if in_ci():
        pytest.fail(f"required reference missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def missing_rocm_tool(reason: str) -> NoReturn:
    """The ROCm toolchain comes from Debian packages: skip only where `.ci/run`'s apt-get step failed (or could not
    run); fail where it succeeded but the tool is still missing."""
    if os.environ.get(ROCM_APT_ENV) == "ok":
        pytest.fail(f"ROCm toolchain missing although .ci/run's apt-get succeeded: {reason}", pytrace=False)
    pytest.skip(reason)


def import_required(name: str, install: str):
    """Import a module a test checks against; a missing one goes through `missing` (allowed at module level)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"{name} not importable ({e}); {install}"
        if in_ci():
            pytest.fail(f"required reference missing in CI: {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
