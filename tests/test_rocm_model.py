"""Whole-model ROCm builds (issue 9): a tiny VPTQ model (residual + outlier codebooks, norm, fp16) compiled for
gfx90a (CDNA, wave64) and gfx1100 (RDNA, wave32), checked by reading the embedded code object: our VQ kernels
are in it with the shapes the registry promises (static-row GEMVs for decode and batch_decode_b<n>, the dlight
dequant matmul for symbolic rows, the norm-bias row dot), compiled for the arch's wavefront, codebooks in LDS.

Nothing runs on AMD hardware (none here): the GEMV's TIR is shared with CUDA (cuda_gemv.GpuParams), so its logic
is what the CUDA GPU tests check; here we check that the ROCm build holds it. Needs rocm-device-libs and lld-19
(.ci/run); skipped otherwise. About 45 s of CPU on 2 cores (90 s wall on the shared box; two archs, mostly LLVM's
AMDGPU codegen, which grows with every static batch function)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from required import missing
from test_rocm_compile import _toolchain_or_skip  # noqa: E402

from vptq_mlc.compile import rocm  # noqa: E402
from vptq_mlc.compile.hsaco import find_code_objects, inspect_library  # noqa: E402

ARCHS = ("gfx90a", "gfx1100")
# static decode batches built here: the smallest and the largest GEMV row counts (register pressure grows with
# rows); the target default is 2..8 (test_static_batches_default_to_the_gemv_rows; test_package_rocm builds it)
STATIC = (2, 8)
OUTLIERS = {"outlier_size": 16, "outlier_vector_len": 4, "num_outlier_centroids": 64}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    _toolchain_or_skip()
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    d = tmp_path_factory.mktemp("rocm_model")
    ckpt = make_synthetic_checkpoint(d / "ckpt", variant="v8-k256-256", hidden_size=64, intermediate_size=128,
                                     num_layers=1, vocab_size=320, layer_kwargs=OUTLIERS)
    model = convert_checkpoint(ckpt, d / "mlc", dtype="float16")
    with pytest.MonkeyPatch.context() as mp:  # the default build: no MFMA GEMM (tests/test_rocm_mfma.py builds it)
        mp.delenv("VPTQ_MLC_ROCM_MFMA", raising=False)
        libs = compile_model(model, "rocm", d / "libs", arch=",".join(ARCHS), static_batches=STATIC)
    return model, {lib.name.rsplit("-", 1)[-1].removesuffix(".so"): lib for lib in libs}


def _layer_configs(model: Path) -> list:
    from vptq_mlc.artifact.chat_config import ChatConfig

    return list(ChatConfig.load(model).vptq_layers().values())


def _vq_kernels(co) -> tuple[dict, dict, dict]:
    """(static-row GEMVs, symbolic-row matmuls, norm-bias row dots) of a code object, told apart by their kernel
    arguments as LLVM records them: a static-row kernel takes only buffers, a symbolic one also the row count."""
    gemv, matmul, row_dot = {}, {}, {}
    for name, meta in co.kernels.items():
        kinds = [a[".value_kind"] for a in meta[".args"]]
        if name.startswith("vq_matmul"):
            (matmul if "by_value" in kinds else gemv)[name] = meta
        elif name.startswith("vq_norm_bias"):
            row_dot[name] = meta
    return gemv, matmul, row_dot


@pytest.mark.parametrize("arch", ARCHS)
def test_model_library_holds_our_vq_kernels(built, arch):
    model, libs = built
    (co,) = inspect_library(libs[arch])
    assert co.arch == arch and co.code_object_version == 5
    cfgs = _layer_configs(model)
    distinct = set(cfgs)  # identical layers share one kernel per row count (the registry's cache)
    gemv, matmul, row_dot = _vq_kernels(co)
    # decode (1 row) and each batch_decode_b<n> get the GEMV, per distinct layer; prefill/batch_decode the matmul
    assert len(gemv) == (1 + len(STATIC)) * len(distinct), sorted(gemv)
    assert len(matmul) == len(distinct), sorted(matmul)
    assert not any("mfma" in k for k in co.kernels)  # VPTQ_MLC_ROCM_MFMA off: dlight's SIMT matmuls
    assert row_dot, "norm-bias row dot missing"
    wave = 64 if arch.startswith("gfx9") else 32
    cfg = cfgs[0]
    codebook_bytes = cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * 2
    for meta in gemv.values():
        assert meta[".wavefront_size"] == wave
        assert meta[".max_flat_workgroup_size"] == 256
        # main + residual codebooks are copied to LDS (static `shared`, not shared.dyn), within the 64 KB limit
        assert codebook_bytes <= meta[".group_segment_fixed_size"] <= 65536
        assert meta[".private_segment_fixed_size"] == 0 and meta[".vgpr_spill_count"] == 0  # accumulators in VGPRs
        names = {a.get(".name") for a in meta[".args"]}
        assert {"xs", "centroids", "codes", "res_centroids", "res_codes", "outlier_centroids", "outlier_codes",
                "y"} <= names
    for meta in [*matmul.values(), *row_dot.values()]:
        assert meta[".wavefront_size"] == wave


def test_readelf_lists_the_vq_kernels(built, tmp_path):
    """binutils' readelf (not our parser) on the carved code object sees the kernels and their descriptors."""
    if subprocess.run(["which", "readelf"], capture_output=True).returncode != 0:
        missing("readelf (binutils) not installed; apt-get install binutils")
    _, libs = built
    for arch in ARCHS:
        (elf,) = find_code_objects(libs[arch].read_bytes())
        p = tmp_path / f"{arch}.hsaco"
        p.write_bytes(elf)
        hdr = subprocess.run(["readelf", "-h", str(p)], capture_output=True, text=True, check=True).stdout
        assert "AMD HSA" in hdr and "AMD GPU" in hdr
        syms = subprocess.run(["readelf", "-sW", str(p)], capture_output=True, text=True, check=True).stdout
        for k in ("vq_matmul_kernel", "vq_norm_bias_kernel", "vq_permute_kernel", "batch_decode_paged_kv_kernel"):
            assert f"{k}.kd" in syms, k


def test_static_batches_default_to_the_gemv_rows():
    from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS

    for arch in ARCHS:
        backend = rocm.RocmBackend(arch)
        assert backend.static_decode_batches == tuple(range(2, MAX_ROWS + 1))
        assert backend.norm_bias_kernels() is not None


def test_gemv_plan_fits_rocm_limits():
    """The plan the GEMV takes on each arch stays within 256 threads and 64 KB of LDS, for every variant family;
    codebooks that do not fit LDS (with the split-reduction scratch) are read from global memory instead."""
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS, plan_gemv, wavefront_params

    for arch, wave in (("gfx90a", 64), ("gfx942", 64), ("gfx1100", 32)):
        params = wavefront_params(rocm.rocm_target(arch))
        assert params.warp_size == wave and params.shared_scope == "shared" and params.max_threads == 256
        for var in ("v8-k256-256", "v8-k4096-0", "v8-k8192-0", "v8-k65536-0", "v12-k4096-0", "v16-k65536-65536"):
            cfg = VPTQLayerConfig.from_variant(var, 4096, 4096)
            for rows in range(1, MAX_ROWS + 1):
                for dtype, el in (("float16", 2), ("float32", 4)):
                    p = plan_gemv(cfg, rows, dtype, params)
                    assert p.warps * wave <= 256, (arch, var, rows, p)
                    cb = cfg.group_num * (cfg.num_centroids + cfg.num_res_centroids) * cfg.vector_len * el
                    red = p.warps * rows * cfg.vector_len * 4
                    assert p.smem_codebook == (cb + red <= 65536), (arch, var, rows, dtype, p)
