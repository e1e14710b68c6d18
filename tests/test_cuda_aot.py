"""CUDA ahead of time on a box with no GPU and no driver: one library, SASS for every arch asked, no CUDA source.

Needs nvcc (the CUDA 13 toolkit) and cuobjdump (toolkit or pip nvidia-cuda-cuobjdump): skipped without them,
failed in CI (tests/required.py).
About 1 minute on 2 cores (tiny model, 2 archs).
"""

from __future__ import annotations

import pytest
from required import missing

from vptq_mlc.compile.cuda import find_nvcc, parse_archs
from vptq_mlc.errors import CompileError, VPTQMLCError


def require_cuda_toolkit(cuobjdump: bool = True) -> None:
    """nvcc (and cuobjdump) or `missing`: CI installs them, so there a missing one fails."""
    from vptq_mlc.compile.fatbin import find_cuobjdump

    try:
        find_nvcc()
        if cuobjdump:
            find_cuobjdump()
    except CompileError as e:
        missing(str(e))


def test_parse_archs_sorts_and_rejects_bad_names():
    assert parse_archs(["sm_90", "sm_80", "sm_90"]) == ("sm_80", "sm_90")
    with pytest.raises(VPTQMLCError, match="bad CUDA arch"):
        parse_archs(["compute_80"])


def test_carve_fatbin_finds_container():
    import struct

    from vptq_mlc.compile.fatbin import FATBIN_MAGIC, carve_fatbins

    payload = b"x" * 40
    fb = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(payload)) + payload
    blob = b"junk" + fb + b"tail" + struct.pack("<I", FATBIN_MAGIC)  # a stray magic is ignored
    assert carve_fatbins(blob) == [fb]


def test_cuda_library_has_sass_for_each_arch_and_no_source(tmp_path):
    require_cuda_toolkit()
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.compile.fatbin import inspect_library
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", variant="v8-k256-256", hidden_size=64,
                                     intermediate_size=128, num_layers=1, vocab_size=320)
    model = convert_checkpoint(ckpt, tmp_path / "mlc", dtype="float16")
    (lib,) = compile_model(model, "cuda", tmp_path / "model-cuda.so", arch="sm_90,sm_80")
    rep = inspect_library(lib)
    assert rep.archs == ["sm_80", "sm_90"], rep
    assert rep.ptx == [], "PTX embedded: the driver would JIT it"
    assert not rep.cuda_source, "CUDA source embedded: the GPU host would need NVRTC/nvcc"
    assert rep.kernels >= 10  # our VQ kernels + dlight-scheduled ops + KV-cache kernels


def test_nvcc_compiles_archs_side_by_side(monkeypatch):
    from vptq_mlc.compile.cuda import nvcc_threads

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert nvcc_threads(("sm_80", "sm_90")) == ["--threads", "2"]
    assert nvcc_threads(("sm_80", "sm_86", "sm_90")) == ["--threads", "2"]
    assert nvcc_threads(("sm_90",)) == []
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert nvcc_threads(("sm_80", "sm_90")) == []
