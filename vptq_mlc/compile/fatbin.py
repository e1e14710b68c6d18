"""Inspect a CUDA model library: carve the embedded fatbin(s) out of the .so and list their ELFs/PTX.

TVM stores the kernel binary as plain data (not an `.nv_fatbin` section), so `cuobjdump lib.so` sees
nothing; we find fatbin containers by their magic and header size instead (docs/gpu-aot.md §2).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vptq_mlc.errors import CompileError

FATBIN_MAGIC = 0xBA55ED50  # fatbin container header: magic u32, version u16, header size u16, payload size u64


def carve_fatbins(blob: bytes) -> list[bytes]:
    """Every fatbin container inside `blob` (header + payload)."""
    out = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = blob.find(magic)
    while pos >= 0:
        if pos + 16 <= len(blob):
            _, version, hsize, psize = struct.unpack_from("<IHHQ", blob, pos)
            end = pos + hsize + psize
            if version == 1 and hsize == 16 and end <= len(blob):
                out.append(blob[pos:end])
                pos = blob.find(magic, end)
                continue
        pos = blob.find(magic, pos + 4)
    return out


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the pip package nvidia-cuda-cuobjdump."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "cuobjdump").exists():
            return str(Path(root) / "bin" / "cuobjdump")
    try:
        import nvidia

        for base in nvidia.__path__:
            for cand in Path(base).glob("*/bin/cuobjdump"):
                return str(cand)
    except ImportError:
        pass
    raise CompileError("cuobjdump not found; pip install nvidia-cuda-cuobjdump (or install the CUDA toolkit)")


@dataclass
class FatbinReport:
    archs: list[str] = field(default_factory=list)  # sm_XX of each embedded ELF (SASS)
    ptx: list[str] = field(default_factory=list)  # PTX entries (should be none)
    kernels: int = 0  # distinct __global__ functions in the largest ELF
    cuda_source: bool = False  # `__global__` text in the .so (the source-embedding fallback)
    fatbin_bytes: int = 0


def inspect_library(path: str | os.PathLike[str]) -> FatbinReport:
    """What arch code a CUDA model library embeds (SASS per arch, PTX, leftover CUDA source)."""
    blob = Path(path).read_bytes()
    rep = FatbinReport(cuda_source=b"__global__" in blob)
    fatbins = carve_fatbins(blob)
    if not fatbins:
        return rep
    tool = find_cuobjdump()
    with tempfile.TemporaryDirectory() as d:
        for n, fb in enumerate(fatbins):
            f = Path(d) / f"k{n}.fatbin"
            f.write_bytes(fb)
            rep.fatbin_bytes += len(fb)
            elf = subprocess.run([tool, "--list-elf", str(f)], capture_output=True, text=True).stdout
            rep.archs += re.findall(r"\.(sm_\d+[a-z]?)\.cubin", elf)
            ptx = subprocess.run([tool, "--list-ptx", str(f)], capture_output=True, text=True).stdout
            rep.ptx += [ln for ln in ptx.splitlines() if ln.startswith("PTX file")]
            res = subprocess.run([tool, "--dump-resource-usage", str(f)], capture_output=True, text=True).stdout
            rep.kernels = max(rep.kernels, len(set(re.findall(r"Function (\S+):", res))))
    rep.archs = sorted(set(rep.archs), key=lambda a: int(re.sub(r"\D", "", a)))
    return rep
