"""Runs the CUDA source TVM generates for the wgmma GEMM (tir_kernels/cuda_wgmma.py) on the CPU, with each PTX
helper it calls replaced by a C++ model of what the PTX ISA says the instruction does, so a box without a GPU can
check the kernel's index math (shared-memory swizzle, matrix descriptors, accumulator fragments, ring slots, row and
column clamps) against numpy. Not its speed, and not the asynchrony: here cp.async copies and wgmma reads happen when
issued.

The models (PTX ISA 8.x, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
- matrix descriptor: start address (bits 0-13, in 16-byte units), stride byte offset (bits 32-45) between 8-row
  groups, layout type (bits 62-63; 1 = 128-byte swizzle). A K-major 128-byte-swizzled operand's element (r, k) lives
  at byte `a = start + (r / 8) * SBO + (r % 8) * 128 + 2 k`, with address bits 4-6 XORed with bits 7-9
  (`a ^ ((a >> 7) & 7) << 4`): the swizzle is a function of the shared-memory address itself.
- wgmma.mma_async m64nNk16 f32.f16.f16, both operands K-major (no transpose): thread t of the warpgroup holds
  D[16 (t / 32) + (t % 32) / 4 + 8 (i % 4 / 2)][8 (i / 4) + 2 (t % 4) + i % 2] in accumulator register i.
- mbarrier: a pending count that starts at the init count; each arrive takes one off, and the arrival that brings it
  to zero completes the phase (the count starts again); try_wait.parity(p) succeeds once the phase of parity p
  completed. cp.async.mbarrier.arrive.noinc is one arrival (the copies before it are already done here).

The kernel runs as in tests/cuda_emulator.py: one OS thread per CUDA thread, blocks one after another, shared memory
a static arena (the dynamic part deliberately not 1024-byte aligned, so the kernel's alignment pad is exercised).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
from cuda_emulator import build_emulation

ARENA_BYTES = 256 * 1024  # the 18-bit shared address window of a matrix descriptor
DYN_SHIFT = 64  # dynamic shared memory starts here: 64-byte aligned (as extern __shared__ __align__(64)), not 1024
STATIC_AT = 240 * 1024  # where a kernel's static __shared__ array (the mbarriers) is placed

_PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
typedef _Float16 half;
struct half2 { half x, y; };
struct float2 { float x, y; };
#define __global__
#define __launch_bounds__(n)
#define __restrict__
#define uint unsigned int
struct dim { long x, y; };
static thread_local dim threadIdx, blockIdx;
static std::barrier<>* g_bar;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
static inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
alignas(1024) static unsigned char g_shared[ARENA];
static inline uint32_t cvta(const void* p) { return (uint32_t)((const unsigned char*)p - g_shared); }
static inline unsigned char* shared_at(uint32_t a) { return g_shared + a; }
template <class... A> static inline void nop(A...) {}
static inline void copy16(uint32_t dst, const void* src) { memcpy(shared_at(dst), src, 16); }
// mbarrier: bits 0-31 pending count, 32-62 init count, 63 phase parity (flips when a phase completes)
static inline std::atomic_ref<uint64_t> bar_at(uint32_t a) {
  return std::atomic_ref<uint64_t>(*(uint64_t*)shared_at(a));
}
static inline void bar_init(uint32_t a, unsigned count) { bar_at(a).store(((uint64_t)count << 32) | count); }
static inline void bar_arrive(uint32_t a) {
  auto b = bar_at(a);
  uint64_t old = b.load(), upd;
  do {
    uint64_t pending = (old & 0xffffffffu) - 1, init = (old >> 32) & 0x7fffffffu, phase = old >> 63;
    upd = pending ? ((old & ~(uint64_t)0xffffffffu) | pending) : (((phase ^ 1) << 63) | (init << 32) | init);
  } while (!b.compare_exchange_weak(old, upd));
}
static inline void bar_wait(const void* p, int parity) {  // phase `parity` completed: the current parity differs
  uint32_t a = cvta(p);
  while ((int)(bar_at(a).load() >> 63) == parity) std::this_thread::yield();
}
static inline float operand(uint64_t desc, int row, int k) {
  if ((desc >> 62) != 1) throw 1;  // only the 128-byte swizzle is modelled
  uint32_t start = (uint32_t)(desc & 0x3fff) << 4, sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
  uint32_t a = start + (row / 8) * sbo + (row % 8) * 128 + 2 * k;
  a ^= ((a >> 7) & 7) << 4;
  return (float)*(const half*)shared_at(a);
}
static void wgmma(float** d, int n, uint64_t da, uint64_t db, unsigned scale_d) {
  int t = (int)(threadIdx.x % 128);
  for (int i = 0; i < n / 2; ++i) {
    int row = 16 * (t / 32) + (t % 32) / 4 + 8 * (i % 4 / 2), col = 8 * (i / 4) + 2 * (t % 4) + i % 2;
    float s = scale_d ? *d[i] : 0.0f;
    for (int k = 0; k < 16; ++k) s += operand(da, row, k) * operand(db, col, k);
    *d[i] = s;
  }
}
"""


def _helper(name: str) -> str:
    """A C++ definition of the TVM helper `name` the kernel calls."""
    if name.endswith("cvta_generic_to_shared"):
        return f"static inline uint32_t {name}(const void* p) {{ return cvta(p); }}"
    if "cp_async_cg" in name and name.endswith("_16"):
        return f"static inline void {name}(uint32_t d, const void* s) {{ copy16(d, s); }}"
    if "mbarrier_init" in name:
        return f"static inline void {name}(uint32_t a, unsigned c) {{ bar_init(a, c); }}"
    if "mbarrier_arrive" in name:  # mbarrier.arrive and cp.async.mbarrier.arrive.noinc
        return f"static inline void {name}(uint32_t a) {{ bar_arrive(a); }}"
    if name == "tvm_builtin_cuda_mbarrier_wait":
        return f"static inline void {name}(const void* p, int parity) {{ bar_wait(p, parity); }}"
    m = re.search(r"wgmma_f16_ss_mma_async_sync_aligned_m64n(\d+)k16_f32_f16_f16_1_1_0_0$", name)
    if m:
        n = int(m.group(1))
        regs = ", ".join(f"float& d{i}" for i in range(n // 2))
        ptrs = ", ".join(f"&d{i}" for i in range(n // 2))
        return (f"static inline void {name}({regs}, uint64_t a, uint64_t b, unsigned s) {{ float* d[] = {{{ptrs}}}; "
                f"wgmma(d, {n}, a, b, s); }}")
    if re.search(r"(cp_async_(commit|wait)_group|fence_proxy|wgmma_(fence|commit_group|wait_group))", name):
        return f"template <class... A> static inline void {name}(A... a) {{ nop(a...); }}"
    raise ValueError(f"no CPU model of {name}")


class WgmmaEmulator:
    """One kernel (`name`, a static-shape launch of `dense_wgmma_cuda`, or of `wgmma_gemm_macro` with its bias
    epilogue) of a generated CUDA source, built as a shared library; `__call__(x, w, y, grid, threads[, bias])` runs
    it."""

    def __init__(self, kernel_source: str, workdir: Path) -> None:
        head, body = kernel_source.split("{", 1)
        sig = re.match(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\((.*)\)\s*$', head.strip())
        name, params = sig.group(1), sig.group(2)
        names = [p.split()[-1] for p in params.split(",")]
        if names not in (["w_ptr", "xf_ptr", "yf_ptr"], ["bias_ptr", "w_ptr", "xf_ptr", "yf_ptr"]):
            raise ValueError(f"expected (w, x, y) or (bias, w, x, y) only (static shapes), got {params}")
        self.has_bias = names[0] == "bias_ptr"
        body = re.sub(r"extern __shared__ __align__\(\d+\) half (\w+)\[\];",
                      rf"half* \1 = (half*)(g_shared + {DYN_SHIFT});", body)
        body = re.sub(r"__shared__ alignas\(\d+\) (\w+) (\w+)\[(\d+)\];",
                      rf"\1* \2 = (\1*)(g_shared + {STATIC_AT});", body)
        helpers = sorted(set(re.findall(r"tvm_builtin_\w+", body)))
        src = (_PRELUDE.replace("ARENA", str(ARENA_BYTES)) + "\n".join(_helper(h) for h in helpers)
               + f"\nstatic void {name}(half* bias_ptr, half* w_ptr, half* xf_ptr, half* yf_ptr) {{" + body + r"""
extern "C" void run(half* bias, half* w, half* x, half* y, long gx, long gy, long nt) {
  std::barrier<> bar(nt); g_bar = &bar;
  std::vector<std::thread> ts;
  for (long t = 0; t < nt; ++t) ts.emplace_back([=, &bar] {
    for (long by = 0; by < gy; ++by) for (long bx = 0; bx < gx; ++bx) {
      threadIdx = {t, 0}; blockIdx = {bx, by}; KERNEL(bias, w, x, y); bar.arrive_and_wait();
    }
  });
  for (auto& th : ts) th.join();
}
""".replace("KERNEL", name))
        self.lib = build_emulation(src, workdir / f"{name}.cpp")

    def __call__(self, x: np.ndarray, w: np.ndarray, y: np.ndarray, grid: tuple[int, int], threads: int,
                 bias: np.ndarray | None = None) -> None:
        if (bias is not None) != self.has_bias:
            raise ValueError("pass bias exactly when the kernel takes one")
        args = [np.ascontiguousarray(a) for a in (w, x, w[:, 0] if bias is None else bias)]
        assert all(a.dtype == np.float16 for a in (*args, y)) and y.flags.c_contiguous
        ptr = ctypes.c_void_p
        self.lib.run(ptr(args[2].ctypes.data), ptr(args[0].ctypes.data), ptr(args[1].ctypes.data),
                     ptr(y.ctypes.data), ctypes.c_long(grid[0]), ctypes.c_long(grid[1]), ctypes.c_long(threads))
