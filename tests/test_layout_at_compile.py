"""Target-specific tensors only where a target reads them: `vptq-mlc convert` writes the generic layout (what the CPU
reads) and `compile --target cuda` adds the code-sorted entries its decode wants. The dir it leaves must equal what
`convert --layout auto` writes (whose entries tests/test_code_sorted_layout.py decodes against the spec reference);
an interrupted addition leaves the dir as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vptq_mlc.artifact.tensor_cache import read_index, read_tensor
from vptq_mlc.cli import main
from vptq_mlc.convert.converter import add_code_sorted_tensors, convert_checkpoint
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, generic-only dir from the CLI's default, dir written with --layout auto) of a tiny model with
    K = 65536 (code-sorted eligible) and K = 65536 + a folded residual layers."""
    d = tmp_path_factory.mktemp("layout")
    ckpt = make_synthetic_checkpoint(d / "ckpt", variant="v8-k65536-256", hidden_size=64, intermediate_size=128,
                                     num_layers=1, vocab_size=320)
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(d / "generic"), "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    auto = convert_checkpoint(ckpt, d / "auto", dtype="float16", layout="auto")
    return ckpt, d / "generic", auto


def _bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("params_shard_*.bin"))


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dest))


def test_convert_default_is_generic_only(converted):
    _, generic, auto = converted
    chat = json.loads((generic / "mlc-chat-config.json").read_text())
    assert chat["vptq"]["layouts"] == ["generic"]
    assert not [n for n in read_index(generic) if ".cs_" in n]
    assert _bytes(generic) < _bytes(auto)


def test_added_entries_equal_convert_auto(converted, tmp_path):
    _, generic, auto = converted
    d = _copy(generic, tmp_path / "m")
    assert add_code_sorted_tensors(d) == 7  # every linear of the one decoder layer
    got, want = read_index(d), read_index(auto)
    assert set(got) == set(want)
    for name in want:
        a, b = read_tensor(d, got[name]), read_tensor(auto, want[name])
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    chat = json.loads((d / "mlc-chat-config.json").read_text())
    assert chat == json.loads((auto / "mlc-chat-config.json").read_text())
    assert add_code_sorted_tensors(d) == 0  # already there: nothing written again
    assert set(read_index(d)) == set(want)


def test_compile_for_cuda_adds_them_and_llvm_does_not(converted, tmp_path, monkeypatch):
    import vptq_mlc.compile.build as build

    _, generic, _ = converted
    d = _copy(generic, tmp_path / "m")
    monkeypatch.setattr(build, "build_library", lambda model_dir, bt, path, *a: path)  # the layout step only
    r = CliRunner().invoke(main, ["compile", str(d), "-o", str(tmp_path / "m.so")])
    assert r.exit_code == 0 and not [n for n in read_index(d) if ".cs_" in n], r.output
    r = CliRunner().invoke(main, ["compile", str(d), "--target", "cuda", "--arch", "sm_80",
                                  "-o", str(tmp_path / "c.so")])
    assert r.exit_code == 0, r.output
    assert "added code-sorted entries for 7 layers" in r.stderr
    assert json.loads((d / "mlc-chat-config.json").read_text())["vptq"]["layouts"] == ["generic", "code-sorted"]


def test_interrupted_addition_leaves_the_dir_unchanged(converted, tmp_path, monkeypatch):
    import vptq_mlc.convert.converter as converter

    _, generic, _ = converted
    d = _copy(generic, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    real, calls = converter.code_sorted_layout, []

    def fail_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(converter, "code_sorted_layout", fail_second)
    with pytest.raises(KeyboardInterrupt):
        add_code_sorted_tensors(d)
    for name, data in before.items():
        assert (d / name).read_bytes() == data, name
    monkeypatch.setattr(converter, "code_sorted_layout", real)
    assert add_code_sorted_tensors(d) == 7  # the next attempt completes
    assert {n for n in read_index(d) if ".cs_" in n}
