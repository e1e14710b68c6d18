"""Runs the CUDA source TVM generates for the split-KV decode attention (tir_kernels/cuda_attention_decode.py) on the
CPU, so a box without a GPU checks the kernel's results (not its speed) against a float64 reference.

The source is the one TVM hands to nvcc (tests/cuda_sources.py), built with TIR's common-subexpression pass off so
the kernels take the shape variables themselves (batch, nnz_pages, ...) rather than host-computed temporaries; the
kernel text is otherwise what a library compiles. It is compiled as C++ with a prelude that emulates what it uses:

- one OS thread per CUDA thread; the blocks of a launch run one after another on the same threads, a barrier
  between blocks; `__syncthreads()` is a `std::barrier`, dynamic shared memory a static array;
- `__shfl_xor_sync` through an exchange array and two barriers of the lane's warp only (a full-mask shuffle: every
  lane of the warp reaches it), so warps run out of step between `__syncthreads()` as on the hardware;
- `cp.async`: each thread queues its copies in commit groups and performs them only when `cp.async.wait_group n`
  leaves at most n groups pending, so a read of staged data before its wait sees stale shared memory;
- `half` is `_Float16` (IEEE binary16, as CUDA's).

Threads run far out of step here (later warps sleep at every `cp.async` wait, so warps drift apart), so a missing
barrier shows up as wrong or run-dependent rows.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

from cuda_emulator import build_emulation

_PRELUDE = r"""
#include <cstdint>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#include <barrier>
#include <stdexcept>
#include <memory>
#include <chrono>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define uint unsigned int
#define uchar unsigned char
typedef _Float16 half;
#define ushort unsigned short
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct ushort4 { unsigned short x, y, z, w; };
static inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
static inline half __float2half_rn(float v) { return (half)v; }
struct dim { long x, y, z; };
static thread_local dim threadIdx, blockIdx;
static thread_local long g_tid;
static std::barrier<>* g_bar;
static thread_local std::barrier<>* t_warp_bar;
alignas(64) static unsigned char buf_dyn_shmem_ptr[1 << 18];
static float g_xch[1024];
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
static inline unsigned __activemask() { return 0xffffffffu; }
static inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int width) {
  if (width != 32) throw std::runtime_error("shuffle width");
  g_xch[g_tid] = v;
  t_warp_bar->arrive_and_wait();
  float r = g_xch[(g_tid & ~31L) | ((g_tid & 31) ^ lane_mask)];
  t_warp_bar->arrive_and_wait();
  return r;
}
static inline float __shfl_down_sync(unsigned, float v, int delta, int width) {
  if (width != 32) throw std::runtime_error("shuffle width");
  g_xch[g_tid] = v;
  t_warp_bar->arrive_and_wait();
  long lane = g_tid & 31;
  float r = lane + delta < 32 ? g_xch[g_tid + delta] : v;
  t_warp_bar->arrive_and_wait();
  return r;
}
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
struct Copy { uint32_t dst; const void* src; };
static thread_local std::vector<std::vector<Copy>> t_groups;
static thread_local std::vector<Copy> t_open;
static inline unsigned tvm_builtin_cuda_cvta_generic_to_shared(void* p) {
  return (unsigned)((unsigned char*)p - buf_dyn_shmem_ptr);
}
static inline void tvm_builtin_ptx_cp_async_cg_async_cg_shared_global_16(uint32_t dst, const void* src) {
  t_open.push_back({dst, src});
}
static inline void tvm_builtin_ptx_cp_async_commit_group_async_commit_group() {
  t_groups.push_back(t_open);
  t_open.clear();
}
static inline void wait_groups(size_t n) {
  // later warps wait longer: warps drift apart, as they may on the GPU, so a missing barrier shows
  std::this_thread::sleep_for(std::chrono::microseconds(20 * (g_tid / 32)));
  while (t_groups.size() > n) {
    for (auto& c : t_groups.front()) memcpy(buf_dyn_shmem_ptr + c.dst, c.src, 16);
    t_groups.erase(t_groups.begin());
  }
}
static inline void tvm_builtin_ptx_cp_async_wait_group_async_wait_group_0() { wait_groups(0); }
static inline void tvm_builtin_ptx_cp_async_wait_group_async_wait_group_1() { wait_groups(1); }
template <class F> static void launch(long gx, long gy, long gz, long nx, long ny, F f) {
  std::barrier<> bar(nx * ny); g_bar = &bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  for (long w = 0; w < (nx * ny + 31) / 32; ++w)
    warp_bars.emplace_back(new std::barrier<>(min(32L, nx * ny - w * 32)));
  std::vector<std::thread> ts;
  for (long t = 0; t < nx * ny; ++t) ts.emplace_back([=, &bar, &warp_bars] {
    g_tid = t;
    t_warp_bar = warp_bars[t / 32].get();
    for (long z = 0; z < gz; ++z) for (long y = 0; y < gy; ++y) for (long x = 0; x < gx; ++x) {
      threadIdx = {t % nx, t / nx, 0}; blockIdx = {x, y, z};
      t_groups.clear(); t_open.clear();
      f();
      bar.arrive_and_wait();
    }
  });
  for (auto& t : ts) t.join();
}
"""


def _signature(src: str, kernel: str) -> list[tuple[str, str]]:
    """(C type, name) of the kernel's parameters."""
    m = re.search(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?' + kernel + r"\(([^)]*)\)\s*\{", src)
    params = []
    for p in m.group(1).split(","):
        p = p.replace("__restrict__", "").strip()
        ctype, name = p.rsplit(" ", 1) if "*" not in p else (p[: p.rindex("*") + 1], p[p.rindex("*") + 1:])
        params.append((ctype.strip(), name.strip()))
    return params


class EmulatedKernels:
    """The generated CUDA of one PrimFunc compiled for the CPU; `launch(name, grid, threads, args)` runs a kernel."""

    def __init__(self, src: str, workdir: Path):
        body = src[src.index('extern "C"'):]
        body = re.sub(r'^extern "C" __global__[^{]*;\s*$', "", body, flags=re.M)  # forward declarations
        # the dynamic shared array: the prelude's static one (TVM names it after its one buffer when there is one)
        body = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];",
                      lambda m: "" if m.group(2) == "buf_dyn_shmem_ptr" else
                      f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)buf_dyn_shmem_ptr;", body)
        body = re.sub(r"__shared__ (alignas\(\d+\)) ", r"\1 static ", body).replace("__shared__", "static")
        self.kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', body)
        self.params = {k: _signature(body, k) for k in self.kernels}
        launchers = []
        for k, params in self.params.items():
            args = ", ".join(f"({t})a[{i}]" if t.endswith("*") else f"*({t}*)a[{i}]" for i, (t, _) in
                             enumerate(params))
            launchers.append(f'extern "C" void run_{k}(long gx, long gy, long gz, long nx, long ny, void** a) '
                             f"{{ launch(gx, gy, gz, nx, ny, [&] {{ {k}({args}); }}); }}")
        body = body.replace('extern "C" __global__', "static")
        self.lib = build_emulation(_PRELUDE + body + "\n" + "\n".join(launchers) + "\n", workdir / "kernels.cc",
                                   ("-fno-strict-aliasing",))

    def launch(self, kernel: str, grid: tuple[int, int, int], threads: tuple[int, int], args: dict[str, Any]) -> None:
        """`args`: buffer name (without `_ptr`) -> contiguous numpy array, scalar name -> number."""
        keep, ptrs = [], []
        for ctype, name in self.params[kernel]:
            if ctype.endswith("*"):
                arr = args[name[: -len("_ptr")]]
                assert arr.flags["C_CONTIGUOUS"]
                ptrs.append(arr.ctypes.data_as(ctypes.c_void_p))
            else:
                ct = {"int": ctypes.c_int32, "int64_t": ctypes.c_int64, "float": ctypes.c_float}[ctype]
                val = ct(args[name])
                keep.append(val)
                ptrs.append(ctypes.cast(ctypes.pointer(val), ctypes.c_void_p))
        arr_t = ctypes.c_void_p * len(ptrs)
        getattr(self.lib, f"run_{kernel}")(*[ctypes.c_long(v) for v in (*grid, *threads)], arr_t(*ptrs))
