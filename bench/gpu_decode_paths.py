"""Do the GPU decode kernels agree? Teacher-forced decode of one prompt through `decode` (static one row: the
hand-scheduled GEMV) and through `batch_decode` (symbolic batch: dequantize-to-smem matmul), comparing logits.

Usage (GPU host): python3 bench/gpu_decode_paths.py MODEL_DIR LIB [steps]. Prints, per step, the max logit
difference (relative to the logit scale) and the top-2 margin of each path, and whether their argmax differ.
"""

from __future__ import annotations

import sys

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from vptq_mlc.runtime.kv_cache import PagedKVCache
from vptq_mlc.runtime.library import load_library, load_params

model, lib_path = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 24
lib = load_library(lib_path, "cuda")
params = load_params(model, lib)
reshape = tvm.get_global_func("vm.builtin.reshape")
embed, prefill = lib.func("embed"), lib.func("prefill")
paths = {"decode": lib.func("decode"), "batch_decode": lib.func("batch_decode")}
caches = {k: PagedKVCache(lib, 1, 256, 64, 16) for k in paths}
prompt = [42]  # the prompt on which tests/gpu saw GPU decode and CPU diverge at step 8


def emb(ids: list[int]):
    e = embed(tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), lib.device), params)
    return reshape(e, ShapeTuple([1, len(ids), int(e.shape[-1])]))


def margin(x: np.ndarray) -> float:
    top = np.sort(x)[-2:]
    return float(top[1] - top[0])


logits = {}
for k, kv in caches.items():
    kv.add(0)
    with kv.forward([0], [len(prompt)]) as c:
        logits[k] = prefill(emb(prompt), c, params)[0].numpy().reshape(-1)
tok = int(np.argmax(logits["decode"]))
worst = 0.0
for step in range(steps):
    for k, kv in caches.items():
        with kv.forward([0], [1]) as c:
            logits[k] = paths[k](emb([tok]), c, params)[0].numpy().reshape(-1).astype(np.float64)
    a, b = logits["decode"], logits["batch_decode"]
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    worst = max(worst, rel)
    print(f"step {step:2d}: max|diff|/scale {rel:.2e}  margin decode {margin(a):.4f} batch {margin(b):.4f}  "
          f"argmax {'same' if a.argmax() == b.argmax() else 'DIFFERENT'}", flush=True)
    tok = int(np.argmax(a))
print(f"worst relative logit difference over {steps} steps: {worst:.2e}")
