"""The pipeline steps the end-to-end tests repeat: a synthetic checkpoint converted and compiled for llvm, and
requests run through an Engine until they finish. Imports nothing heavy at load, so GPU-host checks can use it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def build_llvm(root: Path, convert_options: Mapping[str, Any] | None = None,
               **checkpoint_options: Any) -> tuple[Path, Path, Path]:
    """(checkpoint, MLC model dir, llvm library) under `root`: make_synthetic_checkpoint(**checkpoint_options),
    convert_checkpoint(**convert_options), compile_model for llvm."""
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    ckpt = make_synthetic_checkpoint(root / "ckpt", **checkpoint_options)
    model_dir = convert_checkpoint(ckpt, root / "mlc", **(convert_options or {}))
    (lib,) = compile_model(model_dir, "llvm", root / "model-llvm.so")
    return ckpt, model_dir, lib


def run_requests(engine: Any, prompts: Sequence[Sequence[int]], params: Any) -> list[list[int]]:
    """Every prompt added at once with `params`, stepped until all have finished: their output ids."""
    reqs = [engine.add_request(p, params) for p in prompts]
    while not all(r.finished for r in reqs):
        engine.step()
    return [r.output_ids for r in reqs]
