"""Exact nearest-codeword search on the CPU, as a small C kernel compiled at first use.

Codebook search dominates quantization: every vector of every layer is compared with every centroid, several
times (k-means, the error-feedback pass, the residual pass). torch computes that as a matmul with an inner
dimension of v = 8 plus a separate min, which runs far below the CPU's speed (the [M, K] distance matrix is
written to memory and read back). This kernel keeps running minima in vector registers (4 x 16 lanes) per input vector
instead (about 10x faster than torch on 2 cores), which makes the 10-minute budget for SmolLM2 at K = 4096 reachable.

It is compiled with the system C compiler (`cc`, which TVM's `export_library` needs anyway) into the cache
directory, keyed by the source and the CPU, and loaded with ctypes. Without a compiler, or for tensors on a
GPU, `available()` is False and callers use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PAD = 64  # the kernel's STEP: codebooks are padded to a multiple of this

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <float.h>

/* 16 float lanes (one AVX-512 register, two AVX2 ones); BLOCKS independent lane groups in flight hide the
   latency of the v-long FMA chain. */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define LANES 16
#define BLOCKS 4
#define STEP (LANES * BLOCKS)

static inline vf load(const float *p) { vf r; memcpy(&r, p, sizeof r); return r; }

/* For each row i of x [M, v]: idx[i] = argmin_k |x_i - C[k]|^2, d2[i] = that squared distance.
   Ct is the codebook transposed, [v, Kp], Kp a multiple of STEP; padded columns carry csq = FLT_MAX.
   Single-threaded on purpose: the caller splits rows over threads (ctypes drops the GIL), which avoids a
   second OpenMP runtime spinning against torch's. */
void nearest_f32(const float *x, const float *Ct, const float *csq, int64_t M, int64_t v, int64_t Kp,
                 int64_t *idx, float *d2) {
  for (int64_t i = 0; i < M; ++i) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vf bv[BLOCKS];
    vi bi[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b) { bv[b] = (vf){} + FLT_MAX; bi[b] = (vi){}; }
    const float *xi = x + i * v;
    for (int64_t kb = 0; kb < Kp; kb += STEP) {
      vf d[BLOCKS];
      for (int b = 0; b < BLOCKS; ++b) d[b] = load(csq + kb + b * LANES);
      for (int64_t j = 0; j < v; ++j) {
        const vf a = (vf){} + (-2.0f * xi[j]);
        const float *c = Ct + j * Kp + kb;
        for (int b = 0; b < BLOCKS; ++b) d[b] += a * load(c + b * LANES);
      }
      for (int b = 0; b < BLOCKS; ++b) {
        const vi better = d[b] < bv[b];
        const vi k = lane + (int32_t)(kb + b * LANES);
        bi[b] = (k & better) | (bi[b] & ~better);
        bv[b] = (vf)(((vi)d[b] & better) | ((vi)bv[b] & ~better));
      }
    }
    float best = FLT_MAX;
    int32_t arg = 0;
    for (int b = 0; b < BLOCKS; ++b) {
      for (int l = 0; l < LANES; ++l) {
        if (bv[b][l] < best || (bv[b][l] == best && bi[b][l] < arg)) { best = bv[b][l]; arg = bi[b][l]; }
      }
    }
    float xx = 0.0f;
    for (int64_t j = 0; j < v; ++j) xx += xi[j] * xi[j];
    idx[i] = arg;
    d2[i] = best + xx > 0.0f ? best + xx : 0.0f;
  }
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_executor: ThreadPoolExecutor | None = None
_num_threads: int | None = None
PARALLEL_MIN_WORK = 1 << 21  # distance evaluations worth a second thread


def _cpu_tag() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") or line.startswith("model name"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler")
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "nearest.c"
        src.write_text(_SOURCE)
        tmp = Path(td) / "nearest.so"
        flags = ["-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=fast"]
        r = subprocess.run([cc, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "compile failed")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=out.parent, suffix=".so")
        os.close(fd)
        shutil.copy2(tmp, staged)
        os.replace(staged, out)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("VPTQ_MLC_NO_C_KERNEL"):
            return None
        from vptq_mlc.cache import cache_root

        key = hashlib.sha256((_SOURCE + _cpu_tag()).encode()).hexdigest()[:16]
        path = cache_root() / "kernels" / f"nearest-{key}.so"
        try:
            if not path.is_file():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            log.warning("C nearest-codeword kernel unavailable (%s); using the slower torch path", e)
            return None
        fn = lib.nearest_f32
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
        _lib = lib
        return _lib


def available() -> bool:
    return _load() is not None


class CodebookIndex:
    """A codebook laid out for the kernel ([v, Kp] transposed, padded to a multiple of 64)."""

    def __init__(self, C: torch.Tensor) -> None:
        C = C.detach().to(torch.float32).cpu()
        K, v = C.shape
        Kp = -(-K // PAD) * PAD
        self.K, self.v, self.Kp = K, v, Kp
        Ct = torch.zeros(v, Kp, dtype=torch.float32)
        Ct[:, :K] = C.t()
        csq = torch.full((Kp,), torch.finfo(torch.float32).max, dtype=torch.float32)
        csq[:K] = (C * C).sum(1)
        self.Ct, self.csq = Ct.contiguous(), csq

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nearest index int64 [M], squared distance [M]) for rows of x [M, v] (CPU float32)."""
        lib = _load()
        assert lib is not None
        x = x.detach().to(torch.float32).contiguous()
        M = x.shape[0]
        idx = torch.empty(M, dtype=torch.int64)
        d2 = torch.empty(M, dtype=torch.float32)
        threads = min(_threads(), max(1, M * self.Kp // PARALLEL_MIN_WORK))
        if M == 0:
            return idx, d2
        rows = -(-M // threads)

        def run(s: int) -> None:
            n = min(rows, M - s)
            lib.nearest_f32(
                x.data_ptr() + s * self.v * 4, self.Ct.data_ptr(), self.csq.data_ptr(), n, self.v, self.Kp,
                idx.data_ptr() + s * 8, d2.data_ptr() + s * 4,
            )

        if threads == 1:
            run(0)
        else:
            list(_pool().map(run, range(0, M, rows)))
        return idx, d2


def _threads() -> int:
    return _num_threads or torch.get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Threads for the search (default: torch's count at the time of the call), independent of torch's own:
    the quantizer runs torch single-threaded (its small ops only lose time to thread hand-offs) and keeps
    every core for this kernel."""
    global _num_threads
    _num_threads = n


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None or _executor._max_workers < _threads():
            _executor = ThreadPoolExecutor(max_workers=max(1, _threads()), thread_name_prefix="vptq-nn")
        return _executor
