"""Runs the CUDA source TVM generates for the compiled sampler on the CPU, so a box without a GPU can check the GPU
kernels' results (not their speed) against the numpy reference.

The generated kernels use only plain C++ plus `__shared__`, `__syncthreads()`, `threadIdx` / `blockIdx` and
`expf`; no warp intrinsics or atomics. Each block runs with one OS thread per CUDA thread: `__shared__` arrays
become function statics (the blocks of a launch run one after another on the same threads), `__syncthreads()` a
`std::barrier`. Threads run far out of
step here, so a missing barrier shows up as wrong or batch-dependent tokens. The launch sequence mirrors the
sampler's host code (compile/sampler.py, `gpu_kernel`): scores, compaction and the top-p search's passes over
`splits` blocks per row, then one select block per row.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


def build_emulation(cpp_source: str, cpp: Path, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Write `cpp_source` (generated CUDA made plain C++ by an emulator) to `cpp`, compile it with g++ (C++20,
    threads) into a shared library beside it and load it. Shared by every CUDA emulator of the tests."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("a C++20 compiler (g++) is needed to emulate the generated CUDA")
    cpp.parent.mkdir(parents=True, exist_ok=True)
    cpp.write_text(cpp_source)
    so = cpp.with_suffix(".so")
    subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", *flags, "-o", str(so), str(cpp)],
                   check=True)
    return ctypes.CDLL(str(so))


_PRELUDE = r"""
#include <cstdint>
#include <cmath>
#include <thread>
#include <vector>
#include <barrier>
#define __global__
#define __launch_bounds__(n)
#define CUDART_INF_F INFINITY
#define uint unsigned int
struct dim { long x, y; };
static thread_local dim threadIdx, blockIdx;
static std::barrier<>* g_bar;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
static inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
template <class F> static void launch(long gy, long gx, long nt, F f) {
  std::barrier<> bar(nt); g_bar = &bar;  // the block's threads run every block in turn, a barrier between blocks
  std::vector<std::thread> ts;
  for (long t = 0; t < nt; ++t) ts.emplace_back([=, &bar] {
    for (long y = 0; y < gy; ++y) for (long x = 0; x < gx; ++x) {
      threadIdx = {t, 0}; blockIdx = {x, y}; f(); bar.arrive_and_wait();
    }
  });
  for (auto& t : ts) t.join();
}
"""
# kernel parameter -> the launcher's variable (the remaining host-computed scalar is the block count per row)
_ARGS = {"bias_tok_ptr": "bt", "bias_val_ptr": "bv", "bitmask_ptr": "mask", "fp_ptr": "fp", "ip_ptr": "ip",
         "logits_ptr": "logits", "part_f_ptr": "part_f", "part_i_ptr": "part_i", "pen_cnt_ptr": "pc",
         "pen_tok_ptr": "pt", "work_ptr": "work", "cand_ptr": "cand", "dense_ptr": "dense", "out_lp_ptr": "out_lp",
         "out_tok_ptr": "out_tok", "rows": "rows", "vocab": "vocab", "words": "words", "row_f_ptr": "row_f",
         "search_f_ptr": "search_f", "search_i_ptr": "search_i", "t": "t"}
_KERNEL = "sample_tokens_kernel_kernel"


def _launcher(body: str, threads: tuple[int, int], max_splits: int, min_slice: int, passes: int) -> str:
    slice_var = re.search(r"slice_len_ptr\[0\] = (\w+);", body).group(1)  # the slice length, computed on the host

    def call(kernel: str) -> str:
        params = re.search(r"\b" + kernel + r"\(([^)]*)\)", body).group(1).split(",")
        names = [p.split()[-1] for p in params]
        return f"{kernel}({', '.join('slice' if n == slice_var else _ARGS.get(n, 'splits') for n in names)})"

    split_threads, select_threads = threads
    # scores, compaction, [the top-p search pass (built with top_p_search), launched passes + 1 times,] select
    kernels = [_KERNEL] + [f"{_KERNEL}_{i}" for i in range(1, 4) if re.search(rf"\b{_KERNEL}_{i}\(", body)]
    search = ""
    if len(kernels) == 4:
        search = (f"for (int t = 0; t <= {passes}; ++t) launch(rows, splits, {select_threads}, "
                  f"[=] {{ {call(kernels[2])}; }});")
    return f"""
extern "C" void run_all(float* logits, float* fp, int* ip, int* bt, float* bv, int* pt, int* pc, int* mask,
                        int* out_tok, float* out_lp, float* work, int* cand, int* dense, float* part_f,
                        int* part_i, float* row_f, float* search_f, int64_t* search_i,
                        int64_t rows, int64_t vocab, int64_t words) {{
  int64_t slice = max((vocab + {max_splits - 1}) / {max_splits}, (int64_t){min_slice});
  int64_t splits = (vocab + slice - 1) / slice;
  launch(rows, splits, {split_threads}, [=] {{ {call(kernels[0])}; }});
  launch(rows, splits, {split_threads}, [=] {{ {call(kernels[1])}; }});
{search}
  launch(1, rows, {select_threads}, [=] {{ {call(kernels[-1])}; }});
}}
"""


class EmulatedSampler:
    """A `sample_tokens`-like callable (tvm tensors in, tvm tensors out) running the CUDA kernels on the CPU."""

    def __init__(self, cuda_source: str, workdir: Path) -> None:
        from vptq_mlc.compile import sampler as gpu

        body = cuda_source[cuda_source.index('extern "C" __global__'):]
        body = re.sub(r'extern "C" __global__ void [^{;]*;\n', "", body)  # forward declarations
        body = body.replace('extern "C" ', "").replace("__shared__ alignas(64)", "alignas(64) static")
        assert "__shared__" not in body and "__shfl" not in body and "atomic" not in body, "unsupported construct"
        self.max_splits, self.passes, self.pivots = gpu.MAX_SPLITS, gpu.SEARCH_PASSES, gpu.PIVOTS
        self.lib = build_emulation(_PRELUDE + body + _launcher(body, (gpu.SPLIT_THREADS, gpu.GPU_THREADS),
                                                               gpu.MAX_SPLITS, gpu.MIN_SLICE, gpu.SEARCH_PASSES),
                                   workdir / "sampler_emulated.cpp")

    def __call__(self, *args: Any) -> tuple[Any, Any]:
        import tvm

        from vptq_mlc.artifact.sampler_abi import MAX_TOP

        host = [np.ascontiguousarray(a.numpy()) for a in args]
        rows, vocab = host[0].shape
        # poisoned outputs and workspaces: a value the kernels should have written and did not shows
        out_tok = np.full((rows, MAX_TOP + 1), -7, np.int32)
        out_lp = np.full((rows, MAX_TOP + 1), np.nan, np.float32)
        work = np.full((rows, vocab), np.nan, np.float32)
        cand = np.full((rows, vocab), -9, np.int32)
        dense = np.full((rows, vocab), -11, np.int32)
        part_f = np.full((rows, self.max_splits, 2), np.nan, np.float32)
        part_i = np.full((rows, self.max_splits, 2), -5, np.int32)
        row_f = np.full((rows, 2), np.nan, np.float32)
        search_f = np.full((rows, self.passes + 1, self.max_splits, self.pivots), np.nan, np.float32)
        search_i = np.full((rows, self.passes + 1, 4), -3, np.int64)
        ptrs = [a.ctypes.data_as(ctypes.c_void_p) for a in (*host, out_tok, out_lp, work, cand, dense, part_f, part_i,
                                                            row_f, search_f, search_i)]
        self.lib.run_all(*ptrs, ctypes.c_int64(rows), ctypes.c_int64(vocab), ctypes.c_int64(host[7].shape[1]))
        return tvm.runtime.tensor(out_tok), tvm.runtime.tensor(out_lp)
