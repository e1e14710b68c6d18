"""The CUDA source TVM generates, caught before nvcc, for tests that read the kernels' code (no GPU needed)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def generated_cuda(build: Callable[[Any], object], arch: str = "sm_80,sm_90") -> str:
    """The CUDA source TVM generates inside `build(backend)` for a CUDA backend of `arch` (the nvcc callback is
    replaced by a recorder, so nothing is compiled)."""
    import tvm

    from vptq_mlc.compile.targets import resolve_backend

    (bt,) = resolve_backend("cuda", arch)
    bt.prepare()
    sources: list[str] = []
    previous = tvm.get_global_func("tvm_callback_cuda_compile")
    tvm.register_global_func(
        "tvm_callback_cuda_compile", lambda code, *_: (sources.append(str(code)), b"-")[1], override=True
    )
    try:
        bt.prepare = lambda: None  # prepared above: preparing again would re-install nvcc over the recorder
        build(bt)
    finally:
        tvm.register_global_func("tvm_callback_cuda_compile", previous, override=True)
    (src,) = sources
    return src


def kernel_parts(src: str) -> list[tuple[str, str]]:
    """(kernel name, its text from `extern "C" __global__` to the next one), forward declarations included."""
    out = []
    for part in re.split(r'(?=^extern "C" __global__)', src, flags=re.M)[1:]:
        out.append((re.search(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", part).group(1), part))
    return out


def kernel_definitions(src: str) -> dict[str, str]:
    """Kernel name -> its definition's text (forward declarations left out)."""
    return {name: part for name, part in kernel_parts(src) if "{" in part.split("\n", 1)[0]}
