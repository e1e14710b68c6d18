"""Damaged files and careless flags: each gets one `error:` line naming the problem and the fix, never a traceback,
a signal or a silent wrong answer. The corpus is built here from the tiny synthetic checkpoint / model dir / library
of the other tests and listed with its expected error in docs/malformed-files.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from vptq_mlc.artifact.tensor_cache import read_index
from vptq_mlc.cli import main
from vptq_mlc.errors import ConvertError, RuntimeLoadError
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAYER = "model.layers.0.mlp.down_proj"


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def assert_one_error(result, needle: str) -> None:
    """A CliRunner result that failed with exit code 1 and exactly one `error:` line containing `needle`."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `vptq-mlc` in a fresh process (a crash in native code shows as a signal exit code here)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from vptq_mlc.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def assert_one_error_process(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def built(tiny_served_model: tuple[Path, Path, Path]) -> tuple[Path, Path, Path]:
    return tiny_served_model


def copy_model_dir(model_dir: Path, dest: Path, with_libs: bool = False) -> Path:
    libs = None if with_libs else shutil.ignore_patterns("*.so", "*.so.sha256")
    return Path(shutil.copytree(model_dir, dest, ignore=libs))


# ---- tensor-cache.json: every record checked against its shard before TVM's loader sees it ----------------------

def _first(index: dict) -> dict:
    return index["records"][0]["records"][0]


def _second(index: dict) -> dict:
    return index["records"][0]["records"][1]


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda index: _first(index).update({key: value})


TENSOR_CACHE_CASES: dict[str, tuple[Callable[[dict], None] | str, str]] = {
    "offset-past-end": (lambda i: _first(i).update(byteOffset=i["records"][0]["nbytes"]), "past the end of"),
    "offset-negative": (_set("byteOffset", -64), "must be integers >= 0"),
    "offset-string": (_set("byteOffset", "0"), "must be integers >= 0"),
    "nbytes-too-small": (lambda i: _first(i).update(nbytes=_first(i)["nbytes"] - 4), "takes"),
    "shape-disagrees": (lambda i: _first(i).update(shape=[_first(i)["shape"][0] + 1, *_first(i)["shape"][1:]]),
                        "takes"),
    "shape-negative": (_set("shape", [-1, 64]), "non-negative integers"),
    "dtype-unknown": (_set("dtype", "complex128"), "unknown dtype"),
    "dtype-object": (_set("dtype", "object"), "unknown dtype"),
    "format-unknown": (_set("format", "zstd"), "format 'zstd'"),
    "overlap": (lambda i: _second(i).update(byteOffset=_first(i)["byteOffset"] + 4), "overlap"),
    "duplicate-name": (lambda i: _second(i).update(name=_first(i)["name"]), "listed twice"),
    "datapath-parent": (lambda i: i["records"][0].update(dataPath="../../../../etc/passwd"), "outside the model"),
    "datapath-absolute": (lambda i: i["records"][0].update(dataPath="/etc/passwd"), "outside the model"),
    "datapath-not-string": (lambda i: i["records"][0].update(dataPath=7), "is not a file name"),
    "shard-size-wrong": (lambda i: i["records"][0].update(nbytes=i["records"][0]["nbytes"] + 1), "bytes but"),
    "records-not-list": (lambda i: i.update(records={"a": 1}), '"records" list'),
    "not-json": ("{ not json", "is not valid JSON"),
    "json-list": ("[]", '"records" list'),
}


def _damage_tensor_cache(model_dir: Path, how: Callable[[dict], None] | str) -> None:
    path = model_dir / "tensor-cache.json"
    if isinstance(how, str):
        path.write_text(how)
        return
    index = json.loads(path.read_text())
    how(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("case", list(TENSOR_CACHE_CASES))
def test_tensor_cache_records_are_checked(built, tmp_path, case):
    how, needle = TENSOR_CACHE_CASES[case]
    bad = copy_model_dir(built[1], tmp_path / "bad")
    _damage_tensor_cache(bad, how)
    with pytest.raises(ConvertError, match=needle) as e:
        read_index(bad)
    assert "\n" not in str(e.value) and "re-run `vptq-mlc convert`" in str(e.value)


def test_truncated_shard_is_refused(built, tmp_path):
    bad = copy_model_dir(built[1], tmp_path / "bad")
    shard = bad / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConvertError, match="params_shard_0.bin is 1000 bytes but"):
        read_index(bad)


@pytest.mark.parametrize("case", ["offset-past-end", "offset-negative", "datapath-parent"])
def test_chat_refuses_damaged_tensor_cache(built, tmp_path, case):
    """The three that crashed (rc 139), read outside the file, or opened /etc/passwd: one line, exit code 1."""
    how, needle = TENSOR_CACHE_CASES[case]
    bad = copy_model_dir(built[1], tmp_path / "bad")
    _damage_tensor_cache(bad, how)
    proc = run_cli("chat", str(bad), "--lib", str(built[2]), "--device", "cpu", "--prompt", "hi", "--max-tokens", "2")
    assert_one_error_process(proc, needle)


def test_compile_refuses_damaged_tensor_cache(built, tmp_path):
    bad = copy_model_dir(built[1], tmp_path / "bad")
    _damage_tensor_cache(bad, "{ not json")
    assert_one_error(CliRunner().invoke(main, ["compile", str(bad)]), "tensor-cache.json is not valid JSON")


# ---- mlc-chat-config.json --------------------------------------------------------------------------------------

def _chat_config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model_dir: Path) -> None:
        path = model_dir / "mlc-chat-config.json"
        cfg = json.loads(path.read_text())
        out = edit(cfg)
        path.write_text(json.dumps(cfg if out is None else out))
    return apply


CHAT_CONFIG_CASES = {  # case -> (damage, chat's error, compile's error)
    "json-list": (_chat_config(lambda c: []), "must hold a JSON object, not list", "must hold a JSON object"),
    "not-json": (lambda d: (d / "mlc-chat-config.json").write_text("{"), "is not valid JSON", "is not valid JSON"),
    "model-config-list": (_chat_config(lambda c: c.update(model_config=[])), "model_config must be an object",
                          "model_config must be an object"),
    "eos-string": (_chat_config(lambda c: c.update(eos_token_id="x")), "malformed field", None),
    "temperature-null": (_chat_config(lambda c: c.update(temperature=None)), "malformed field", None),
    "tokenizer-files-int": (_chat_config(lambda c: c.update(tokenizer_files=5)), "tokenizer_files", None),
    "missing-model-config": (_chat_config(lambda c: c.pop("model_config") and None), None, "'model_config' is missing"),
    "hidden-size-string": (_chat_config(lambda c: c["model_config"].update(hidden_size="64")), None,
                           "model_config.hidden_size must be an integer >= 1"),
    "layer-num-centroids-0": (_chat_config(lambda c: c["vptq"]["layers"][LAYER].update(num_centroids=[-1, 0])), None,
                              "num_centroids=0 unsupported"),
}


@pytest.mark.parametrize("case", [c for c, v in CHAT_CONFIG_CASES.items() if v[1]])
def test_chat_refuses_malformed_chat_config(built, tmp_path, case):
    damage, needle, _ = CHAT_CONFIG_CASES[case]
    bad = copy_model_dir(built[1], tmp_path / "bad")
    damage(bad)
    r = CliRunner().invoke(main, ["chat", str(bad), "--lib", str(built[2]), "--device", "cpu", "--prompt", "hi"])
    assert_one_error(r, needle)


@pytest.mark.parametrize("case", [c for c, v in CHAT_CONFIG_CASES.items() if v[2]])
def test_compile_refuses_malformed_chat_config(built, tmp_path, case):
    damage, _, needle = CHAT_CONFIG_CASES[case]
    bad = copy_model_dir(built[1], tmp_path / "bad")
    damage(bad)
    assert_one_error(CliRunner().invoke(main, ["compile", str(bad), "-o", str(tmp_path / "x.so")]), needle)
    assert not (tmp_path / "x.so").exists()


def test_eval_refuses_malformed_chat_config_and_tokenizer(built, tmp_path):
    bad = copy_model_dir(built[1], tmp_path / "bad")
    _chat_config(lambda c: [])(bad)
    r = CliRunner().invoke(main, ["eval", "ppl", str(bad), "--lib", str(built[2]), "--ctx", "16", "--max-tokens", "32"])
    assert_one_error(r, "must hold a JSON object")
    (bad / "tokenizer.json").write_text("{")
    r = CliRunner().invoke(main, ["eval", "ppl", str(bad), "--lib", str(built[2]), "--ctx", "16", "--max-tokens", "32"])
    assert_one_error(r, "tokenizer.json is not a valid tokenizer")


def test_chat_refuses_corrupt_tokenizer_config(built, tmp_path):
    bad = copy_model_dir(built[1], tmp_path / "bad")
    (bad / "tokenizer_config.json").write_text("[1, 2")
    r = CliRunner().invoke(main, ["chat", str(bad), "--lib", str(built[2]), "--device", "cpu", "--prompt", "hi"])
    assert_one_error(r, "tokenizer_config.json is not valid JSON")


# ---- model library (.so) -----------------------------------------------------------------------------------------

def test_truncated_library_is_one_error_line_not_sigbus(built, tmp_path):
    lib = built[2]
    bad = tmp_path / "bad.so"
    bad.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    proc = run_cli("chat", str(built[1]), "--lib", str(bad), "--prompt", "hi")
    assert_one_error_process(proc, "is truncated or corrupt")


def test_library_check_catches_every_truncation(built, tmp_path):
    from vptq_mlc.runtime.library import check_library_file

    data = built[2].read_bytes()
    check_library_file(built[2])  # the intact library passes
    bad = tmp_path / "bad.so"
    for n in (0, 3, 40, 100, 4096, len(data) // 4, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(RuntimeLoadError, match="truncated or corrupt"):
            check_library_file(bad)
    bad.write_bytes(b"MZ" + data[2:])  # not ELF (e.g. a file of another platform)
    with pytest.raises(RuntimeLoadError, match="not an ELF shared library"):
        check_library_file(bad)



def elf64_section(data: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of the named section of a little-endian ELF64 file, read straight from the headers."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        if data[strtab + sh_name:].split(b"\0", 1)[0] == name.encode():
            return offset, size
    raise AssertionError(f"no {name} section")


def copy_library(lib: Path, dest: Path, sidecar: bool) -> Path:
    """A copy of the library under a new name, with its sidecar rewritten for that name (as `sha256sum` makes it)."""
    shutil.copyfile(lib, dest)
    if sidecar:
        digest = Path(f"{lib}.sha256").read_text().split()[0]
        Path(f"{dest}.sha256").write_text(f"{digest}  {dest.name}\n")
    return dest


def test_compile_records_the_library_checksum(built):
    lib = built[2]
    assert Path(f"{lib}.sha256").read_text() == f"{hashlib.sha256(lib.read_bytes()).hexdigest()}  {lib.name}\n"
    check = subprocess.run(["sha256sum", "-c", f"{lib.name}.sha256"], cwd=lib.parent, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == f"{lib.name}: OK", check


def test_library_overwritten_in_place_is_refused_by_its_checksum(built, tmp_path):
    from vptq_mlc.runtime.library import check_library_file

    bad = copy_library(built[2], tmp_path / "bad.so", sidecar=True)
    data = bytearray(bad.read_bytes())
    offset, size = elf64_section(bytes(data), ".text")
    assert size >= 3 * 4096, size
    start = offset + size // 2 - 2048
    data[start:start + 4096] = b"\xff" * 4096
    bad.write_bytes(bytes(data))
    assert bad.stat().st_size == built[2].stat().st_size
    check_library_file(bad)  # the structure is intact: only the checksum can tell
    proc = run_cli("chat", str(built[1]), "--lib", str(bad), "--prompt", "hi")
    assert_one_error_process(proc, "bad.so does not match its checksum bad.so.sha256")
    assert "re-run `vptq-mlc compile`" in proc.stderr
    assert subprocess.run(["sha256sum", "-c", "bad.so.sha256"], cwd=tmp_path, capture_output=True).returncode == 1


def test_library_with_and_without_sidecar_loads(built, tmp_path, caplog):
    from vptq_mlc.runtime.library import check_library_checksum, load_library

    assert load_library(copy_library(built[2], tmp_path / "good.so", sidecar=True), "cpu").has("embed")
    old = copy_library(built[2], tmp_path / "old.so", sidecar=False)  # built before sidecars existed
    with caplog.at_level(logging.INFO, logger="vptq_mlc.runtime.library"):
        assert load_library(old, "cpu").has("embed")
    assert any("old.so has no .sha256 checksum file" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
    Path(f"{old}.sha256").write_text("not a digest\n")
    with pytest.raises(RuntimeLoadError, match="cannot read the checksum of model library .*old.so"):
        check_library_checksum(old)


def test_find_library_ignores_checksum_files(built, tmp_path):
    from vptq_mlc.runtime.device import DeviceSpec, find_library

    model_dir = copy_model_dir(built[1], tmp_path / "m")
    Path(model_dir / "m-cpu.so.sha256").write_text("0" * 64 + "  m-cpu.so\n")
    with pytest.raises(RuntimeLoadError, match="no cpu model library"):
        find_library(model_dir, DeviceSpec("cpu"))
    lib = copy_library(built[2], model_dir / "m-cpu.so", sidecar=True)
    assert find_library(model_dir, DeviceSpec("cpu")) == lib

# ---- checkpoints: NaN/inf, impossible layer configs, corrupt tokenizer files ---------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", variant="v8-k256-16",
                                     layer_kwargs={"is_indice_packed": False})


def _tensor(name: str, edit: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        t = load_file(str(d / "model.safetensors"))
        a = t[name].copy()
        edit(a)
        t[name] = a
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return apply


def _layer_config(**changes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["config_for_layers"][LAYER].update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return apply


def _nan(a: np.ndarray) -> None:
    a.flat[3] = np.nan


def _inf(a: np.ndarray) -> None:
    a.flat[-1] = -np.inf


CHECKPOINT_CASES = {
    "nan-dense-norm": (_tensor("model.norm.weight", _nan), "dense tensor model.norm.weight: expected finite"),
    "inf-dense-embedding": (_tensor("model.embed_tokens.weight", _inf),
                            "dense tensor model.embed_tokens.weight: expected finite"),
    "nan-dense-lm-head": (_tensor("lm_head.weight", _nan), "dense tensor lm_head.weight: expected finite"),
    "nan-codebook": (_tensor(f"{LAYER}.centroids.weight", _nan), "'centroids.weight' expected finite"),
    "inf-residual-codebook": (_tensor(f"{LAYER}.res_centroids.weight", _inf), "'res_centroids.weight' expected finite"),
    "nan-scale": (_tensor(f"{LAYER}.weight_scale", _nan), "'weight_scale' expected finite"),
    "num-centroids-0": (_layer_config(num_centroids=[-1, 0]), "num_centroids=0 unsupported"),
    "num-centroids-negative": (_layer_config(num_centroids=[-1, -1]), "num_centroids=-1 unsupported"),
    "vector-len-0": (_layer_config(vector_lens=[-1, 0]), "vector length must be >= 1"),
    "group-size-disagrees": (_layer_config(group_size=7), "in_features=128 != outlier_size"),
    "out-features-disagree": (_layer_config(out_features=7), "the architecture needs 128/64"),
    "tokenizer-not-json": (lambda d: (d / "tokenizer.json").write_text('{"model": '),
                           "tokenizer.json is not valid JSON"),
    "tokenizer-invalid": (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}'),
                          "tokenizer.json is not a valid tokenizer"),
    "tokenizer-config-list": (lambda d: (d / "tokenizer_config.json").write_text("[]"),
                              "tokenizer_config.json must hold a JSON object"),
}


@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_refused_by_inspect_and_convert(synth, tmp_path, case, command):
    damage, needle = CHECKPOINT_CASES[case]
    bad = Path(shutil.copytree(synth, tmp_path / "bad"))
    damage(bad)
    out = tmp_path / "out"
    args = ["inspect", str(bad)] if command == "inspect" else ["convert", str(bad), "-o", str(out)]
    assert_one_error(CliRunner().invoke(main, args), needle)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---- flags and hints for a new user ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [("--temperature", "-1"), ("--top-p", "2"), ("--top-p", "0"), ("--max-tokens", "0"),
                                  ("--top-k", "-1"), ("--repetition-penalty", "0"), ("--seed", "-1"),
                                  ("--temperature", "nan"), ("--context-window", "0")])
def test_chat_options_checked_before_the_model_loads(tmp_path, flag):
    """The model dir does not even exist: the option is refused first (click: exit code 2, the option named)."""
    r = CliRunner().invoke(main, ["chat", str(tmp_path / "nothing"), *flag, "--prompt", "hi"])
    assert r.exit_code == 2 and f"Invalid value for '{flag[0]}'" in r.stderr, r.output


def test_inspect_on_a_converted_dir_says_what_to_run(built):
    r = CliRunner().invoke(main, ["inspect", str(built[1])])
    assert_one_error(r, "is a converted model directory")
    assert f"vptq-mlc compile {built[1]}" in r.stderr and f"vptq-mlc chat {built[1]}" in r.stderr


def test_compile_on_a_checkpoint_suggests_convert_outside_it(synth, tmp_path):
    r = CliRunner().invoke(main, ["compile", str(synth)])
    suggested = synth.resolve().parent / f"{synth.name}-mlc"
    assert_one_error(r, f"vptq-mlc convert {synth} -o {suggested}")
    assert not suggested.resolve().is_relative_to(synth.resolve())


def test_chat_hints(built, tmp_path):
    r = CliRunner().invoke(main, ["chat", str(tmp_path / "nosuchdir"), "--prompt", "hi"])
    assert_one_error(r, "does not exist")
    uncompiled = copy_model_dir(built[1], tmp_path / "uncompiled")
    r = CliRunner().invoke(main, ["chat", str(uncompiled), "--device", "cpu", "--prompt", "hi"])
    assert_one_error(r, f"`vptq-mlc compile {uncompiled} --target llvm`")
    r = CliRunner().invoke(main, ["chat", str(built[0]), "--prompt", "hi"])  # a checkpoint
    assert_one_error(r, f"`vptq-mlc convert {built[0]} -o {built[0].resolve().parent / (built[0].name + '-mlc')}`")
    r = CliRunner().invoke(main, ["chat", str(built[1]), "--device", "cpu:7", "--prompt", "hi"])
    assert_one_error(r, "device 'cpu:7' does not exist")


def test_bundled_alias_does_not_ignore_lib(built, tmp_path, monkeypatch):
    import vptq_mlc.bundled

    def no_build(name: str):
        raise AssertionError("the bundled model was built before --lib was checked")

    monkeypatch.chdir(tmp_path)  # no ./smollm2 here, so `smollm2` is the bundled alias
    monkeypatch.setattr(vptq_mlc.bundled, "ensure_bundled_model", no_build)
    r = CliRunner().invoke(main, ["chat", "smollm2", "--lib", "foo.so", "--prompt", "hi"])
    assert_one_error(r, "model library not found: foo.so")  # refused before the model is built
    monkeypatch.setattr(vptq_mlc.bundled, "ensure_bundled_model", lambda name: (built[1], built[2]))
    bad = tmp_path / "mine.so"
    bad.write_bytes(b"\x7fELF not really")
    r = CliRunner().invoke(main, ["chat", "smollm2", "--lib", str(bad), "--prompt", "hi"])
    assert_one_error(r, "mine.so is truncated or corrupt")  # the given library is the one loaded


def test_compile_cuda_without_arch_names_the_archs(built, tmp_path, monkeypatch):
    import vptq_mlc.compile.build as build
    from vptq_mlc.compile.cuda import DEFAULT_CUDA_ARCHS

    built_for = []
    monkeypatch.setattr(build, "build_library", lambda model_dir, bt, path, *a: built_for.append(bt.archs) or path)
    r = CliRunner().invoke(main, ["compile", str(built[1]), "--target", "cuda", "-o", str(tmp_path / "m.so")])
    assert r.exit_code == 0, r.output
    assert f"no --arch given: building for {', '.join(DEFAULT_CUDA_ARCHS)}" in r.stderr
    assert built_for == [DEFAULT_CUDA_ARCHS]


def test_progress_lines_off_a_terminal(monkeypatch):
    from vptq_mlc.progress import progress_bar

    fake = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", fake)
    for _ in progress_bar(range(3), desc="work", unit="step"):
        pass
    lines = fake.getvalue().splitlines()
    assert "\r" not in fake.getvalue() and lines and lines[-1].startswith("work: 100%") and "3/3" in lines[-1]


def test_eval_ppl_shows_progress_off_a_terminal(built):
    r = CliRunner().invoke(main, ["eval", "ppl", str(built[1]), "--lib", str(built[2]), "--ctx", "16",
                                  "--max-tokens", "48"])
    assert r.exit_code == 0, r.output
    assert any(ln.startswith("ppl compiled") and "100%" in ln for ln in r.stderr.splitlines()), r.stderr
