"""The command line of the GPU kernel scripts under bench/ that build on the build box and run on the GPU host
(`python3 bench/NAME.py build ART [--arch A]`, `python3 bench/NAME.py run ART [--json R] [--reps N]`), and the way
tests load such a script by path (they are scripts, not modules of a package)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from vptq_mlc.errors import RuntimeLoadError, VPTQMLCError


def build_run_main(doc: str | None, build: Callable[[Path, str], None],
                   run: Callable[[Path, Path | None, int], int]) -> None:
    """Parse `build OUT [--arch]` / `run ART [--json] [--reps]` and call `build` or exit with `run`'s status; bad
    input (no CUDA device, an unreadable folder) ends in one line, as the CLI does."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--arch", default="sm_90")
    r = sub.add_parser("run")
    r.add_argument("art", type=Path)
    r.add_argument("--json", type=Path)
    r.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    try:
        if a.cmd == "build":
            build(a.out, a.arch)
        else:
            sys.exit(run(a.art, a.json, a.reps))
    except (VPTQMLCError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def load_script(path: Path) -> ModuleType:
    """bench/NAME.py as module NAME (registered in sys.modules: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def gpu_run_setup(art: Path, files: list[str], script: str):
    """What a kernel script's `run` starts with: every file `build` writes must be in `art` (else one line naming
    the build command), TVM's CUDA device (the plugin loaded by hand under a runtime-only TVM) and the cold-L2
    timer of the kernel benches (`bench.kernels.ColdL2Timer`: reads a buffer larger than L2 before every call)."""
    from vptq_mlc.bench.kernels import ColdL2Timer
    from vptq_mlc.runtime.device import resolve_device

    missing = [str(art / f) for f in files if not (art / f).is_file()]
    if missing:
        raise RuntimeLoadError(f"{', '.join(missing)} missing; build them with `python3 bench/{script} build {art}`")
    return resolve_device("cuda")[1], ColdL2Timer()
