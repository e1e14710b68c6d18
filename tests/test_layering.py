"""The architecture's import rules and the lint rules, checked in the pytest run so they cannot silently stop
being checked: import-linter's contracts (`[tool.importlinter]` in pyproject.toml) and `ruff check`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The console script next to this interpreter (the `test` extra installs both), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run `pip install -e '.[test]'`"
    return found


def test_import_layers_hold() -> None:
    """Lower layers never import higher ones, no circles between layers, the runtime imports no compiler."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout, r.stdout[-4000:]


def test_ruff_check_passes() -> None:
    r = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# The target backends (compile/backend.py says what they carry); the only files that may look at a target's kind.
BACKEND_FILES = {f"vptq_mlc/compile/{n}.py" for n in ("backend", "targets", "cpu", "cuda", "rocm")}
# Code that builds libraries: it asks the backend instead of comparing kinds (package/select.py matches a host device
# against a prebuilt library's record and runtime/ works with device kinds: those are not compile targets).
BUILD_SIDE = ("vptq_mlc/compile/", "vptq_mlc/tir_kernels/", "vptq_mlc/model/", "vptq_mlc/package/builder.py",
              "vptq_mlc/bundled.py", "vptq_mlc/bench/")
_TARGET_NAMES = r"""["'](?:llvm|cuda|rocm|cpu)["']"""
_KIND_CHECK = re.compile(
    r"\bkind\.name\b"  # a tvm Target's kind, anywhere
    rf"|\bkind\s*(?:==|!=)\s*{_TARGET_NAMES}|{_TARGET_NAMES}\s*(?:==|!=)\s*[\w.]*kind\b"  # kind == "cuda"
    rf"|\bkind\s+(?:not\s+)?in\s*[(\[{{]\s*{_TARGET_NAMES}"  # kind in ("llvm", ...)
)


def test_target_kind_is_checked_only_in_the_backends() -> None:
    """What differs between targets lives on its backend (kernels, batches, pipeline, set-up), so a new target is
    one file: no `target.kind.name` anywhere else, no `kind == "cuda"` on the build side."""
    found = []
    for path in sorted((ROOT / "vptq_mlc").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in BACKEND_FILES:
            continue
        build_side = rel.startswith(BUILD_SIDE)
        for no, line in enumerate(path.read_text().splitlines(), 1):
            m = _KIND_CHECK.search(line)
            if m and (build_side or "kind.name" in m.group(0)):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert not found, "target kind checked outside compile/{cpu,cuda,rocm}.py; move it onto the backend:\n" + "\n".join(
        found)
