"""The checks the GPU host runs on the tiny fp16 DeepSeek-V3 (tests/gpu/test_deepseek_gpu.py), here on llvm: the
folder bench/gpu_artifacts.sh's `e2eds` part builds (checkpoint, fp16 convert, transformers' reference.npz, the
llvm library) goes through the same `check_library`, so the check code and the saved reference are exercised in CI
and an fp16 deepseek_v3 build is checked against transformers on CPU, chunked prefill and prefix reuse included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from deepseek_e2e import REL_BOUND, STEPS, check_library, load_reference, make_checkpoint, write_reference

from vptq_mlc.compile.build import compile_model
from vptq_mlc.convert.converter import convert_checkpoint


def test_fp16_deepseek_llvm_passes_the_gpu_checks(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    convert_checkpoint(ckpt, tmp_path / "model", dtype="float16")
    write_reference(ckpt, tmp_path / "reference.npz")
    compile_model(tmp_path / "model", "llvm", tmp_path / "model-cpu.so")
    prompts, greedy, ref = load_reference(tmp_path / "reference.npz")
    assert greedy.shape == (len(prompts), STEPS) and ref.shape[:2] == greedy.shape
    assert np.array_equal(ref.argmax(-1), greedy)  # the saved logits are those the greedy tokens came from
    worst = check_library(tmp_path, "model-cpu.so", "cpu", chunked=True)
    assert max(v for k, v in worst.items() if not k.endswith("tokens")) < REL_BOUND
    assert all(v > 0 for k, v in worst.items() if k.endswith("tokens"))
