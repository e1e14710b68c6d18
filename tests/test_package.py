"""`vptq-mlc package`: a tiny synthetic model packaged for llvm (always), ROCm and CUDA (when their toolchains are
here); manifest hashes checked with hashlib; incremental rebuilds; the llvm library chats from the package with
runtime-only TVM; corrupted / mismatched / unfitting packages give one-line errors; library selection on a pretend
AMD GPU (the HIP test double of test_rocm_runtime.py)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tvm
from required import missing, missing_rocm_tool
from test_rocm_runtime import fake_hip_dir, runtime_lib  # noqa: F401,E402  (fixtures: one build per session)

from vptq_mlc.artifact.cpu_features import missing_features
from vptq_mlc.package.builder import PackageBuilder
from vptq_mlc.package.builder import _code_hash as real_code_hash  # bound before frozen_code_hash patches it
from vptq_mlc.package.config import PackageConfig, PackageError, TargetSpec
from vptq_mlc.package.manifest import read_manifest, sha256_file
from vptq_mlc.package.select import HostDevice, _arch_rank, fits, select_library
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _config(root: Path, targets: list[str], name: str = "tiny") -> Path:
    cfg = root / f"pkg-{name}.json"
    cfg.write_text(json.dumps({"output": "dist", "models": [{"name": name, "source": "ckpt", "targets": targets}]}))
    return cfg


@pytest.fixture(scope="module", autouse=True)
def frozen_code_hash():
    """Freeze the code part of the fingerprints in this module: a build takes minutes on the shared machine while
    others edit vptq_mlc/, which would (rightly) trigger rebuilds. test_code_hash checks that part on its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vptq_mlc.package.builder._code_hash", lambda *subs, root=None: "frozen:" + ",".join(subs))
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    make_synthetic_checkpoint(root / "ckpt", arch="llama", variant="v8-k256-0", dtype="float32", seed=3)
    return root


@pytest.fixture(scope="module")
def llvm_pkg(root) -> Path:
    (model_dir,) = PackageBuilder(PackageConfig.load(_config(root, ["llvm"]))).build()
    return model_dir


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=300)


def test_manifest_matches_files(llvm_pkg):
    m = read_manifest(llvm_pkg)
    chat = json.loads((llvm_pkg / "mlc-chat-config.json").read_text())
    assert m["model"] == "tiny" and m["quantization"] == chat["quantization"]
    (lib,) = m["libraries"]
    cpu = tvm.target.codegen.llvm_get_system_cpu()  # llvm builds for this host's CPU by default
    assert lib["file"] == f"tiny-{chat['quantization']}-llvm-{cpu}.so" and lib["target"] == "llvm"
    assert lib["abi"]["machine"] == platform.machine() and lib["abi"]["cpu_features"]
    assert missing_features(lib["abi"]["cpu_features"]) == []
    assert lib["tvm"] == "0.27.0.post1"
    listed = {lib["file"]: lib} | m["weights"]["files"]
    on_disk = {p.name for p in llvm_pkg.iterdir() if p.name != "manifest.json" and not p.name.endswith(".sha256")}
    assert set(listed) == on_disk
    # the library's sidecar (what `chat --lib` checks outside a package) agrees with the manifest
    assert (llvm_pkg / f"{lib['file']}.sha256").read_text() == f"{lib['sha256']}  {lib['file']}\n"
    for name, rec in listed.items():
        data = (llvm_pkg / name).read_bytes()
        assert rec["size"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()


def test_rerun_builds_nothing(root, llvm_pkg):
    lib = next(llvm_pkg.glob("*.so"))
    before = lib.stat().st_mtime_ns
    b = PackageBuilder(PackageConfig.load(_config(root, ["llvm"])))
    b.build()
    assert b.rebuilt == [] and lib.stat().st_mtime_ns == before


def test_code_hash(tmp_path):
    """An edit to any source of the hashed subpackages changes the hash; other subpackages do not count."""
    for sub in ("model", "runtime"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.py").write_text("x = 1\n")
    h1 = real_code_hash("model", root=tmp_path)
    (tmp_path / "runtime" / "a.py").write_text("x = 2\n")
    assert real_code_hash("model", root=tmp_path) == h1
    (tmp_path / "model" / "a.py").write_text("x = 2\n")
    assert real_code_hash("model", root=tmp_path) != h1


def test_lost_weight_file_restaged_without_recompiling(root, llvm_pkg):
    (llvm_pkg / "tokenizer_config.json").unlink()
    b = PackageBuilder(PackageConfig.load(_config(root, ["llvm"])))
    b.build()
    assert b.rebuilt == ["tiny:weights"]  # same inputs -> same fingerprint -> the library is kept
    assert (llvm_pkg / "tokenizer_config.json").exists()


def test_chat_from_package_runtime_only(llvm_pkg):
    res = _run(f"""
        import sys
        sys.modules["torch"] = None
        from vptq_mlc.cli import main
        try:
            main(["chat", {str(llvm_pkg)!r}, "--prompt", "hello", "--max-tokens", "4", "--temperature", "0",
                  "--raw"], standalone_mode=False)
        finally:
            import tvm
            print("RUNTIME_ONLY", tvm.base._RUNTIME_ONLY, "compiler mapped",
                  "libtvm_compiler" in open("/proc/self/maps").read())
    """, TVM_USE_RUNTIME_LIB="1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RUNTIME_ONLY True compiler mapped False" in res.stdout
    reply = res.stdout.split("RUNTIME_ONLY")[0]
    assert reply.strip() != ""


def _copy_pkg(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupted_library_is_refused(llvm_pkg, tmp_path):
    pkg = _copy_pkg(llvm_pkg, tmp_path / "tiny")
    lib = next(pkg.glob("*.so"))
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match manifest.json"):
        select_library(pkg, "cpu")
    res = _run(f"""
        from vptq_mlc.cli import main
        main(["chat", {str(pkg)!r}, "--prompt", "hi", "--max-tokens", "2"])
    """)
    assert res.returncode == 1 and res.stderr.startswith("error: library") and "Traceback" not in res.stderr


def test_manifest_mismatch_is_refused(llvm_pkg, tmp_path):
    pkg = _copy_pkg(llvm_pkg, tmp_path / "tiny")
    m = json.loads((pkg / "manifest.json").read_text())
    m["libraries"][0]["size"] += 1
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="mixed from two builds"):
        select_library(pkg, "cpu")
    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        select_library(pkg, "cpu")


def test_no_fitting_library_names_host_and_offers(llvm_pkg, tmp_path):
    pkg = _copy_pkg(llvm_pkg, tmp_path / "tiny")
    m = json.loads((pkg / "manifest.json").read_text())
    m["libraries"][0].update(target="rocm", archs=["gfx90a"])
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError) as e:
        select_library(pkg, "auto")
    msg = str(e.value)
    assert "no library" in msg and "cpu (" in msg and "offers rocm gfx90a" in msg


def test_arch_matching_rules():
    cuda = {"target": "cuda", "archs": ["sm_80", "sm_90"]}
    assert fits(cuda, HostDevice("cuda:0", "cuda", "sm_86"))  # sm_80 SASS runs on sm_86
    assert fits(cuda, HostDevice("cuda:0", "cuda", "sm_90"))
    assert not fits({"target": "cuda", "archs": ["sm_80"]}, HostDevice("cuda:0", "cuda", "sm_90"))
    assert not fits({"target": "cuda", "archs": ["sm_90"]}, HostDevice("cuda:0", "cuda", "sm_89"))
    # arch-specific code (a wgmma build for sm_90 alone) runs on that arch only
    assert fits({"target": "cuda", "archs": ["sm_90a"]}, HostDevice("cuda:0", "cuda", "sm_90"))
    assert not fits({"target": "cuda", "archs": ["sm_90a"]}, HostDevice("cuda:0", "cuda", "sm_91"))
    assert not fits({"target": "cuda", "archs": ["sm_90a"]}, HostDevice("cuda:0", "cuda", "sm_89"))
    assert fits({"target": "rocm", "archs": ["gfx90a"]}, HostDevice("rocm:0", "rocm", "gfx90a"))
    assert not fits({"target": "rocm", "archs": ["gfx942"]}, HostDevice("rocm:0", "rocm", "gfx90a"))
    assert not fits({"target": "llvm", "abi": {"machine": "aarch64"}}, HostDevice("cpu", "llvm", "x86_64"))
    # on an sm_90 GPU the arch-specific build is preferred to the multi-arch one, which is preferred to older SASS
    h90 = HostDevice("cuda:0", "cuda", "sm_90")
    ranks = [_arch_rank(lib, h90) for lib in ({"archs": ["sm_90a"]}, cuda, {"archs": ["sm_80"]})]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == 3


def test_config_errors(tmp_path):
    with pytest.raises(PackageError, match="unknown target"):
        TargetSpec.parse("metal")
    bad = [
        ({"models": []}, "non-empty"),
        ({"models": [{"name": "a", "source": "x"}]}, "needs"),
        ({"models": [{"name": "a b", "source": "x", "targets": ["llvm"]}]}, "letters"),
        ({"models": [{"name": "a", "source": "x", "targets": ["cuda:sm_80", "cuda:sm_90"]}]}, "listed twice"),
        ({"models": [{"name": "a", "source": "x", "targets": ["llvm"], "convert": {"bits": 2}}]}, "unknown convert"),
    ]
    for raw, msg in bad:
        with pytest.raises(PackageError, match=msg):
            PackageConfig.from_dict(raw, tmp_path)
    cfg = PackageConfig.from_dict({"models": [{"name": "a", "source": "ck", "targets": ["rocm:gfx90a,gfx1100"]}]},
                                  tmp_path)
    assert cfg.output == tmp_path / "dist" and cfg.models[0].source == tmp_path / "ck"
    assert cfg.models[0].targets == [TargetSpec("rocm", "gfx90a,gfx1100")]


# ---- ROCm: selection on a pretend gfx90a GPU, and packaging ----

def test_rocm_library_selected_on_pretend_gpu(llvm_pkg, tmp_path, fake_hip_dir, runtime_lib):
    """A package with gfx1100 and gfx90a ROCm libraries (kernel libraries, built here) and the llvm one: the
    HIP test double reports a gfx90a, so auto picks rocm:0 and the gfx90a file; --device cpu picks llvm."""
    from test_rocm_compile import _toolchain_or_skip, build_rocm_kernels
    from test_rocm_runtime import _run_on_fake_gpu

    _toolchain_or_skip()
    pkg = _copy_pkg(llvm_pkg, tmp_path / "tiny")
    m = json.loads((pkg / "manifest.json").read_text())
    for arch in ("gfx1100", "gfx90a"):
        f = build_rocm_kernels(arch, pkg / f"tiny-q-rocm-{arch}.so")
        m["libraries"].append({"file": f.name, "target": "rocm", "archs": [arch], "sha256": sha256_file(f),
                               "size": f.stat().st_size})
    (pkg / "manifest.json").write_text(json.dumps(m))
    out = _run_on_fake_gpu(fake_hip_dir, runtime_lib, f"""
        from vptq_mlc.package.select import select_library
        for d in ("auto", "cpu"):
            path, device = select_library({str(pkg)!r}, d)
            print("PICK", d, path.name, device)
    """, tmp_path / "hip.log")
    assert "PICK auto tiny-q-rocm-gfx90a.so rocm:0" in out
    assert f"PICK cpu {m['libraries'][0]['file']} cpu" in out


def _check_manifest_hashes(model_dir: Path) -> dict:
    m = read_manifest(model_dir)
    for lib in m["libraries"]:
        data = (model_dir / lib["file"]).read_bytes()
        assert lib["size"] == len(data) and lib["sha256"] == hashlib.sha256(data).hexdigest()
    return m


def test_package_rocm(root):
    """Each ROCm library holds one code object for its arch, with the model's kernels in it (our VQ kernels:
    tests/test_rocm_model.py checks them in detail)."""
    from vptq_mlc.compile import rocm
    from vptq_mlc.compile.hsaco import inspect_library
    from vptq_mlc.errors import CompileError

    try:
        rocm.find_bitcode_dir()
        rocm.find_ld_lld()
    except CompileError as e:
        missing_rocm_tool(f"ROCm build toolchain missing: {e}")
    (model_dir,) = PackageBuilder(PackageConfig.load(_config(root, ["rocm:gfx90a,gfx1100"], name="rocm"))).build()
    m = _check_manifest_hashes(model_dir)
    by = {tuple(lib["archs"]): lib for lib in m["libraries"]}
    for arch in ("gfx90a", "gfx1100"):
        lib = by[(arch,)]
        (co,) = inspect_library(model_dir / lib["file"])
        assert co.arch == arch and co.code_object_version == lib["abi"]["code_object_version"] == 5
        assert lib["target"] == "rocm" and lib["file"].endswith(f"-rocm-{arch}.so")
        assert "batch_decode_paged_kv_kernel" in co.kernels and len(co.kernels) > 10
        assert "vq_matmul_kernel" in co.kernels and "vq_permute_kernel" in co.kernels


def test_package_cuda(root):
    """The CUDA library's fatbin holds SASS for exactly the claimed archs, no PTX, no CUDA source."""
    from vptq_mlc.compile.cuda import find_nvcc
    from vptq_mlc.compile.fatbin import inspect_library
    from vptq_mlc.errors import CompileError

    try:
        find_nvcc()
    except CompileError as e:
        missing(str(e))
    (model_dir,) = PackageBuilder(PackageConfig.load(_config(root, ["cuda:sm_80,sm_90"], name="cuda"))).build()
    m = _check_manifest_hashes(model_dir)
    (lib,) = m["libraries"]
    assert lib["target"] == "cuda" and lib["archs"] == ["sm_80", "sm_90"] and lib["file"].endswith("-cuda.so")
    rep = inspect_library(model_dir / lib["file"])
    assert rep.archs == ["sm_80", "sm_90"] and rep.ptx == [] and not rep.cuda_source
