"""Runs one CUDA kernel TVM generates for a warp-level tensor-core schedule (`ldmatrix` + `mma.sync.m16n8k16`, e.g.
tir_kernels/cuda_mma_wide.py) on the CPU, with each PTX instruction's inline-asm block replaced by a C++ model of what
the PTX ISA says it does, so a box without a GPU checks the kernel's index math and fragment layouts against numpy.
Not its speed.

The models (PTX ISA, "Warp Level Matrix Multiply-Accumulate Instructions"; g = lane / 4, q = lane % 4):
- `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`: lanes 8j..8j+7 give the addresses of rows 0..7 (16 bytes
  each) of matrix j; register j of lane t holds, without .trans, row g elements 2q and 2q+1 of matrix j, with .trans
  rows 2q and 2q+1, element g (the matrix read column-major).
- `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32` ("Matrix Fragments for mma.m16n8k16 with floating point
  type"): A registers a0a1 = A[g][2q, 2q+1], a2a3 = A[g+8][2q..], a4a5 = A[g][2q+8..], a6a7 = A[g+8][2q+8..]; B b0b1 =
  B[2q, 2q+1][g], b2b3 = B[2q+8, 2q+9][g]; C/D c0c1 = D[g][2q, 2q+1], c2c3 = D[g+8][2q..]. Sums in fp32 (the order
  of the hardware's adds is not modelled: it changes results by fp32 rounding only).
Warp-collective instructions exchange operands through a per-warp table between two warp barriers; `__syncwarp` is
a warp barrier and `__syncthreads` a block barrier. Each CUDA thread is an OS thread, blocks run one after another
(tests/cuda_emulator.py; first to last, or last to first), shared memory is a static arena, so a missing barrier
shows as wrong or flaky results. Blocks one after another also make `__threadfence` a no-op and `atomicAdd` a
plain read-modify-write.

`layout="wrong-trans"` swaps the .trans and plain ldmatrix models, `layout="wrong-b"` swaps B's two registers: the
tests show a kernel checked this way fails with a wrong fragment layout.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
from cuda_emulator import build_emulation

_PRELUDE = r"""
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
typedef _Float16 half;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(2) uchar2 { unsigned char x, y; };
struct alignas(8) half4 { half x, y, z, w; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(8) uchar8 { unsigned char v[8]; };
#define __global__
#define __launch_bounds__(n)
#define __restrict__
struct dim { int x, y; };
static thread_local dim threadIdx, blockIdx;
static std::barrier<>* g_block_bar;
static std::vector<std::barrier<>*> g_warp_bar;
static inline std::barrier<>& warp_bar() { return *g_warp_bar[threadIdx.y]; }
static inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
static inline void __syncwarp() { warp_bar().arrive_and_wait(); }
static inline half __float2half_rn(float f) { return (half)f; }
// blocks run one after another, so a device-wide fence orders nothing more and an atomic is a plain update
static inline void __threadfence() {}
static inline int atomicAdd(int* p, int v) { int old = *p; *p = old + v; return old; }
static inline float __ldcg(const float* p) { return *p; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
alignas(1024) static unsigned char g_dyn[DYN_BYTES];
alignas(1024) static unsigned char g_static[STATIC_BYTES];
// per-warp operand tables of the collective instructions
struct WarpTable { const unsigned char* addr[32]; unsigned a[32][4]; unsigned b[32][2]; float c[32][4]; };
static std::vector<WarpTable> g_tables;
static inline half half_at(const unsigned char* p, int e) { half h; memcpy(&h, p + 2 * e, 2); return h; }
static inline unsigned pack(half lo, half hi) {
  unsigned short l, h; memcpy(&l, &lo, 2); memcpy(&h, &hi, 2); return (unsigned)l | ((unsigned)h << 16);
}
static inline half lo_half(unsigned r) { unsigned short s = r & 0xffff; half h; memcpy(&h, &s, 2); return h; }
static inline half hi_half(unsigned r) { unsigned short s = r >> 16; half h; memcpy(&h, &s, 2); return h; }
static void ldmatrix_x4(bool trans, const void* addr, unsigned* r0, unsigned* r1, unsigned* r2, unsigned* r3) {
  if (WRONG_TRANS) trans = !trans;
  int t = threadIdx.x;
  WarpTable& w = g_tables[threadIdx.y];
  w.addr[t] = (const unsigned char*)addr;
  warp_bar().arrive_and_wait();
  unsigned* out[4] = {r0, r1, r2, r3};
  int g = t / 4, q = t % 4;
  for (int j = 0; j < 4; ++j) {
    const unsigned char* const* rows = &w.addr[8 * j];
    if (!trans) *out[j] = pack(half_at(rows[g], 2 * q), half_at(rows[g], 2 * q + 1));
    else *out[j] = pack(half_at(rows[2 * q], g), half_at(rows[2 * q + 1], g));
  }
  warp_bar().arrive_and_wait();
}
static void mma_m16n8k16(float* d0, float* d1, float* d2, float* d3, unsigned a0, unsigned a1, unsigned a2,
                         unsigned a3, unsigned b0, unsigned b1, float c0, float c1, float c2, float c3) {
  int t = threadIdx.x;
  WarpTable& w = g_tables[threadIdx.y];
  unsigned av[4] = {a0, a1, a2, a3};
  unsigned bv[2] = {b0, b1};
  if (WRONG_B) { unsigned s = bv[0]; bv[0] = bv[1]; bv[1] = s; }
  float cv[4] = {c0, c1, c2, c3};
  memcpy(w.a[t], av, sizeof av); memcpy(w.b[t], bv, sizeof bv); memcpy(w.c[t], cv, sizeof cv);
  warp_bar().arrive_and_wait();
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    int g = l / 4, q = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * q + h] = (float)(h ? hi_half(w.a[l][0]) : lo_half(w.a[l][0]));
      A[g + 8][2 * q + h] = (float)(h ? hi_half(w.a[l][1]) : lo_half(w.a[l][1]));
      A[g][2 * q + 8 + h] = (float)(h ? hi_half(w.a[l][2]) : lo_half(w.a[l][2]));
      A[g + 8][2 * q + 8 + h] = (float)(h ? hi_half(w.a[l][3]) : lo_half(w.a[l][3]));
      B[2 * q + h][g] = (float)(h ? hi_half(w.b[l][0]) : lo_half(w.b[l][0]));
      B[2 * q + 8 + h][g] = (float)(h ? hi_half(w.b[l][1]) : lo_half(w.b[l][1]));
      C[g][2 * q + h] = w.c[l][h];
      C[g + 8][2 * q + h] = w.c[l][2 + h];
    }
  }
  int g = t / 4, q = t % 4;
  float* d[4] = {d0, d1, d2, d3};
  for (int i = 0; i < 4; ++i) {
    int row = g + 8 * (i / 2), col = 2 * q + i % 2;
    float s = C[row][col];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    *d[i] = s;
  }
  warp_bar().arrive_and_wait();
}
"""

_LDMATRIX = re.compile(
    r"unsigned int addr = __cvta_generic_to_shared\((?P<addr>.*?)\);\s*__asm__ __volatile__\(\s*"
    r'"ldmatrix\.sync\.aligned\.m8n8\.x4(?P<trans>\.trans)?\.shared\.b16"\s*"[^"]*"\s*:\s*(?P<outs>.*?)\s*:\s*'
    r'"r"\(addr\)\s*\);', re.S)
_MMA = re.compile(
    r'__asm__ __volatile__\(\s*"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32"\s*"[^"]*"\s*:\s*'
    r"(?P<ops>.*?)\);", re.S)


def _operands(text: str) -> list[str]:
    """The C expressions of an asm operand list `"=r"(expr), "f"(expr), ...` (expressions with nested parens)."""
    out, i = [], 0
    while True:
        m = re.compile(r'"=?[rf]"\(').search(text, i)
        if not m:
            return out
        depth, j = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        out.append(text[m.end():j - 1])
        i = j


def _replace_ldmatrix(m: re.Match) -> str:
    outs = _operands(m.group("outs"))
    assert len(outs) == 4, outs
    trans = "true" if m.group("trans") else "false"
    return f"ldmatrix_x4({trans}, (const void*)({m.group('addr')}), " + ", ".join(f"&({o})" for o in outs) + ");"


def _replace_mma(m: re.Match) -> str:
    ops = _operands(m.group("ops"))
    assert len(ops) == 14, ops
    return "mma_m16n8k16(" + ", ".join(f"&({o})" for o in ops[:4]) + ", " + ", ".join(ops[4:]) + ");"


class MmaKernelEmulator:
    """One kernel of a generated CUDA source (static shapes, 2-D thread block (32, warps), 1-D grid), built as a
    shared library; `__call__(args, grid, warps)` runs it on numpy arrays given in the kernel's parameter order."""

    def __init__(self, kernel_source: str, workdir: Path, layout: str = "ptx") -> None:
        head, body = kernel_source.split("{", 1)
        sig = re.match(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\((.*)\)\s*$', head.strip())
        name, params = sig.group(1), sig.group(2)
        self.params = [p.split()[-1] for p in params.split(",")]
        dyn = re.findall(r"extern __shared__ __align__\(\d+\) (\w+) (\w+)\[\];", body)
        body = re.sub(r"extern __shared__ __align__\(\d+\) (\w+) (\w+)\[\];", r"\1* \2 = (\1*)g_dyn;", body)
        offset = 0
        statics = []

        def static(m: re.Match) -> str:
            nonlocal offset
            size = {"half": 2, "float": 4, "int": 4}[m.group(1)] * int(m.group(3))
            out = f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)(g_static + {offset});"
            statics.append(m.group(2))
            offset += -(-size // 1024) * 1024
            return out

        body = re.sub(r"__shared__ alignas\(\d+\) (\w+) (\w+)\[(\d+)\];", static, body)
        body, n_ld = _LDMATRIX.subn(_replace_ldmatrix, body)
        body, n_mma = _MMA.subn(_replace_mma, body)
        assert "__asm__" not in body, "an inline-asm block without a CPU model"
        self.counts = {"ldmatrix": n_ld, "mma": n_mma, "dynamic_shared": len(dyn), "static_shared": len(statics)}
        prelude = (_PRELUDE.replace("DYN_BYTES", str(256 * 1024)).replace("STATIC_BYTES", str(max(offset, 1024)))
                   .replace("WRONG_TRANS", "1" if layout == "wrong-trans" else "0")
                   .replace("WRONG_B", "1" if layout == "wrong-b" else "0"))
        args = ", ".join(f"void* a{i}" for i in range(len(self.params)))
        cast = ", ".join(f"({p.rsplit(' ', 1)[0].replace('__restrict__', '').strip()})a{i}"
                         for i, p in enumerate(params.split(",")))
        src = (prelude + f"\nstatic void {name}({params}) {{" + body + f"""
extern "C" void run({args}, long grid, long warps, long reverse) {{
  std::barrier<> block(warps * 32); g_block_bar = &block;
  std::vector<std::barrier<>*> wb; for (long w = 0; w < warps; ++w) wb.push_back(new std::barrier<>(32));
  g_warp_bar = wb; g_tables.assign(warps, WarpTable{{}});
  std::vector<std::thread> ts;
  for (long t = 0; t < warps * 32; ++t) ts.emplace_back([=, &block] {{
    for (long i = 0; i < grid; ++i) {{
      long bx = reverse ? grid - 1 - i : i;
      threadIdx = {{(int)(t % 32), (int)(t / 32)}}; blockIdx = {{(int)bx, 0}};
      {name}({cast}); block.arrive_and_wait();
    }}
  }});
  for (auto& th : ts) th.join();
  for (auto* b : wb) delete b;
}}
""")
        self.lib = build_emulation(src, workdir / f"{name}_{layout}.cpp")

    def __call__(self, args: dict[str, np.ndarray], grid: int, warps: int, reverse: bool = False) -> None:
        """`args`: parameter name without `_ptr` -> C-contiguous array (outputs are written in place); `reverse`:
        the blocks run from the last to the first (a kernel whose result must not depend on the blocks' order)."""
        arrays = [args[p.removesuffix("_ptr")] for p in self.params]
        assert all(a.flags.c_contiguous for a in arrays)
        self.lib.run(*(ctypes.c_void_p(a.ctypes.data) for a in arrays), ctypes.c_long(grid), ctypes.c_long(warps),
                     ctypes.c_long(int(reverse)))
