"""Read the HSA code objects (HSACO) inside an exported ROCm model library, without ROCm tools or a GPU.

TVM stores each ROCm module's code object as plain bytes in the library's data, so `readelf` on the `.so`
sees only the host ELF. This module carves the AMDGPU ELF out and reads what a release check needs: the gfx
arch and code object version (ELF header + the `amdhsa.target` metadata), the kernels (symbols with a `.kd`
kernel descriptor) and each kernel's metadata (kernarg layout, wavefront size, workgroup limit), which LLVM
writes as a msgpack note (NT_AMDGPU_METADATA).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EM_AMDGPU = 224
NT_AMDGPU_METADATA = 32
# EF_AMDGPU_MACH values (LLVM's ELF.h) for the archs we build; the metadata's target string is authoritative.
MACH_TO_ARCH = {0x2F: "gfx906", 0x30: "gfx908", 0x3F: "gfx90a", 0x4C: "gfx942", 0x41: "gfx1100", 0x36: "gfx1030"}
_FEATURE = {0x0: "unsupported", 0x1: "any", 0x2: "off", 0x3: "on"}


@dataclass
class CodeObject:
    """One AMDGPU code object: its target and its kernels."""

    size: int
    abi_version: int
    code_object_version: int
    e_flags: int
    arch: str  # from amdhsa.target (e.g. gfx90a)
    target: str  # e.g. amdgcn-amd-amdhsa-hcc-gfx90a
    mach_arch: str | None  # from e_flags, when the value is in MACH_TO_ARCH
    xnack: str
    sramecc: str
    symbols: list[str]
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> metadata map


def find_code_objects(data: bytes) -> list[bytes]:
    """Every AMDGPU ELF embedded in `data` (a ROCm model library), in file order."""
    out = []
    i = data.find(b"\x7fELF", 1)
    while i >= 0:
        if len(data) - i >= 64 and data[i + 4] == 2 and struct.unpack_from("<H", data, i + 18)[0] == EM_AMDGPU:
            size = _elf_size(data, i)
            out.append(data[i : i + size])
            i = data.find(b"\x7fELF", i + size)
        else:
            i = data.find(b"\x7fELF", i + 4)
    return out


def _elf_size(data: bytes, base: int) -> int:
    phoff, shoff = struct.unpack_from("<QQ", data, base + 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, base + 0x36)
    end = shoff + shentsize * shnum
    for k in range(phnum):
        _, _, off, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, base + phoff + k * phentsize)
        end = max(end, off + filesz)
    for k in range(shnum):
        _, sh_type, _, _, off, sz, *_ = struct.unpack_from("<IIQQQQIIQQ", data, base + shoff + k * shentsize)
        if sh_type != 8:  # SHT_NOBITS occupies no file bytes
            end = max(end, off + sz)
    return end


def _sections(elf: bytes) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, size, link, entsize) for every section."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    out = []
    for k in range(shnum):
        _, t, _, _, off, sz, link, _, _, entsize = struct.unpack_from("<IIQQQQIIQQ", elf, shoff + k * shentsize)
        out.append((t, off, sz, link, entsize))
    return out


def _notes(elf: bytes) -> list[tuple[str, int, bytes]]:
    out = []
    for t, off, sz, _, _ in _sections(elf):
        if t != 7:  # SHT_NOTE
            continue
        p = off
        while p + 12 <= off + sz:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, p)
            name = elf[p + 12 : p + 12 + namesz].rstrip(b"\0").decode("ascii", "replace")
            dpos = p + 12 + ((namesz + 3) & ~3)
            out.append((name, ntype, elf[dpos : dpos + descsz]))
            p = dpos + ((descsz + 3) & ~3)
    return out


def _symbols(elf: bytes) -> list[str]:
    secs = _sections(elf)
    names = []
    for t, off, sz, link, entsize in secs:
        if t not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        stroff = secs[link][1]
        for k in range(1, sz // entsize):
            st_name = struct.unpack_from("<I", elf, off + k * entsize)[0]
            end = elf.index(b"\0", stroff + st_name)
            names.append(elf[stroff + st_name : end].decode("ascii", "replace"))
    return sorted(set(n for n in names if n))


def unpack_msgpack(buf: bytes) -> Any:
    """Decode one msgpack value (the subset LLVM writes: maps, arrays, strings, ints, bools, floats)."""
    value, pos = _mp(buf, 0)
    return value


def _mp(b: bytes, p: int) -> tuple[Any, int]:
    c = b[p]
    p += 1
    if c <= 0x7F:
        return c, p
    if c >= 0xE0:
        return c - 0x100, p
    if 0x80 <= c <= 0x8F:
        return _mp_map(b, p, c & 0x0F)
    if 0x90 <= c <= 0x9F:
        return _mp_arr(b, p, c & 0x0F)
    if 0xA0 <= c <= 0xBF:
        n = c & 0x1F
        return b[p : p + n].decode("utf-8", "replace"), p + n
    fixed = {0xC0: None, 0xC2: False, 0xC3: True}
    if c in fixed:
        return fixed[c], p
    ints = {0xCC: "<B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
            0xCA: ">f", 0xCB: ">d"}
    if c in ints:
        fmt = ints[c]
        return struct.unpack_from(fmt, b, p)[0], p + struct.calcsize(fmt)
    if c in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        lf = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I", 0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}[c]
        n = struct.unpack_from(lf, b, p)[0]
        p += struct.calcsize(lf)
        raw = b[p : p + n]
        return (raw.decode("utf-8", "replace") if c >= 0xD9 else raw), p + n
    if c in (0xDC, 0xDD):
        n = struct.unpack_from(">H" if c == 0xDC else ">I", b, p)[0]
        return _mp_arr(b, p + (2 if c == 0xDC else 4), n)
    if c in (0xDE, 0xDF):
        n = struct.unpack_from(">H" if c == 0xDE else ">I", b, p)[0]
        return _mp_map(b, p + (2 if c == 0xDE else 4), n)
    raise ValueError(f"unsupported msgpack byte 0x{c:02x} at {p - 1}")


def _mp_arr(b: bytes, p: int, n: int) -> tuple[list, int]:
    out = []
    for _ in range(n):
        v, p = _mp(b, p)
        out.append(v)
    return out, p


def _mp_map(b: bytes, p: int, n: int) -> tuple[dict, int]:
    out = {}
    for _ in range(n):
        k, p = _mp(b, p)
        v, p = _mp(b, p)
        out[k] = v
    return out, p


def inspect_code_object(elf: bytes) -> CodeObject:
    """Target, code object version and kernels of one AMDGPU ELF."""
    if elf[:4] != b"\x7fELF" or struct.unpack_from("<H", elf, 18)[0] != EM_AMDGPU:
        raise ValueError("not an AMDGPU ELF code object")
    abi = elf[8]
    e_flags = struct.unpack_from("<I", elf, 0x30)[0]
    meta: dict = {}
    for name, ntype, desc in _notes(elf):
        if name == "AMDGPU" and ntype == NT_AMDGPU_METADATA:
            meta = unpack_msgpack(desc)
    target = str(meta.get("amdhsa.target", ""))
    arch = target[target.rfind("gfx") :] if "gfx" in target else ""
    kernels = {str(k.get(".name")): k for k in meta.get("amdhsa.kernels", [])}
    return CodeObject(
        size=len(elf),
        abi_version=abi,
        code_object_version=abi + 2,  # ELFABIVERSION_AMDGPU_HSA_V3 = 1 ... V6 = 4
        e_flags=e_flags,
        arch=arch.split(":")[0],
        target=target,
        mach_arch=MACH_TO_ARCH.get(e_flags & 0xFF),
        xnack=_FEATURE[(e_flags >> 8) & 0x3],
        sramecc=_FEATURE[(e_flags >> 10) & 0x3],
        symbols=_symbols(elf),
        kernels=kernels,
    )


def inspect_library(path: str | Path) -> list[CodeObject]:
    """Every code object in a ROCm model library (TVM embeds one per library)."""
    return [inspect_code_object(e) for e in find_code_objects(Path(path).read_bytes())]
