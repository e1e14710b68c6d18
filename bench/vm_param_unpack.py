"""Host time the relax VM spends unpacking a function's parameter tuple: a function that takes N tensors in a tuple
and returns every 100th (so the VM fetches and checks all N, as a model's `decode` does with its weights before its
first kernel). Prints the VM's instruction counts and microseconds per call on this machine's CPU.

    python3 bench/vm_param_unpack.py [--params 1187] [--calls 200]
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import tvm
from tvm import relax


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1187, help="tensors in the tuple (v8-k4096-0 7B: 1187)")
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    bb = relax.BlockBuilder()
    params = relax.Var("params", relax.TupleType([relax.TensorType(ndim=1, dtype="float32")] * a.params))
    with bb.function("main", [params]):
        items = [bb.emit(relax.TupleGetItem(params, i)) for i in range(a.params)]
        bb.emit_func_output(bb.emit(relax.Tuple(items[::100])))
    ex = relax.build(bb.get(), "llvm")
    lines = ex.as_text().splitlines()
    calls = collections.Counter(line.split()[1] for line in lines if line.strip().startswith("call"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(np.zeros(4, "float32")) for _ in range(a.params)]
    f = vm["main"]
    f(args)
    t0 = time.perf_counter()
    for _ in range(a.calls):
        f(args)
    us = (time.perf_counter() - t0) / a.calls * 1e6
    print(f"{a.params} parameters: {us:.1f} us per call; VM calls: {dict(calls.most_common(4))}")


if __name__ == "__main__":
    main()
