"""runtime/device.py: device strings, absent devices as one-line errors, the library-name rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tvm

from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.device import DeviceSpec, find_library, parse_device, resolve_device


@pytest.mark.parametrize(
    "text, want",
    [("cpu", DeviceSpec("cpu")), ("CUDA", DeviceSpec("cuda", 0)), ("cuda:1", DeviceSpec("cuda", 1)),
     ("rocm:0", DeviceSpec("rocm", 0)), (" auto ", None)],
)
def test_parse(text: str, want: DeviceSpec | None) -> None:
    assert parse_device(text) == want


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cpu:0:1", "metal"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(RuntimeLoadError, match="unknown device"):
        parse_device(text)


def test_cpu_and_auto() -> None:
    spec, dev = resolve_device("cpu")
    assert spec == DeviceSpec("cpu") and dev == tvm.cpu(0)
    assert resolve_device("auto")[0].kind in ("cpu", "cuda", "rocm")


def test_absent_devices_are_clear_errors() -> None:
    for text in ("cuda:7", "rocm:7"):
        with pytest.raises(RuntimeLoadError, match=rf"device {text} is not available: .*; pick another with --device"):
            resolve_device(text)


def test_find_library_rule(tmp_path: Path) -> None:
    names = ["m-llvm.so", "m-cuda.so", "m-rocm-gfx942.so", "old_cpu.so", "notes.txt", "m-sm90.so"]
    for i, n in enumerate(names):
        (tmp_path / n).write_text(n)
        os.utime(tmp_path / n, (1000 + i, 1000 + i))
    assert find_library(tmp_path, DeviceSpec("cpu")).name == "old_cpu.so"  # newest of llvm/cpu
    assert find_library(tmp_path, DeviceSpec("cuda", 1)).name == "m-sm90.so"
    assert find_library(tmp_path, DeviceSpec("rocm")).name == "m-rocm-gfx942.so"
    (tmp_path / "m-cuda.so").touch()
    assert find_library(tmp_path, DeviceSpec("cuda")).name == "m-cuda.so"
    for n in names:
        (tmp_path / n).unlink()
    (tmp_path / "smollm-llvm.so").write_text("")  # "smollm" is not the word "sm"
    with pytest.raises(RuntimeLoadError, match=r"no cuda model library .*found: smollm-llvm.so.*--lib"):
        find_library(tmp_path, DeviceSpec("cuda"))
