"""Host time the relax VM spends on a function's parameter tuple, as a model library's functions take their weights,
with TVM's lowering alone and with our `fetch_params_at_first_use` pass after it (compile/param_fetch.py; every
target's pipeline runs it). Two functions over N tensors in one tuple, each unpacking all N at its entry as the
model export does:

- `first_kernel`: calls a marker function (standing for the first kernel) with the first tensor, then returns every
  100th: the time from the call to the marker is what a decode call spends before its first launch;
- `one_table`: returns the first tensor only, as `embed` reads one table: the whole call's time.

Prints microseconds on this machine's CPU (median of `--calls`).

    python3 bench/vm_param_unpack.py [--params 1187] [--calls 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from vptq_mlc.compile.backend import vm_lowering_passes
from vptq_mlc.compile.param_fetch import fetch_params_at_first_use

MARKER = "vptq_mlc.bench.first_kernel"


def _module(n: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    tensor = relax.TensorType([4], "float32")
    for name in ("first_kernel", "one_table"):
        x = relax.Var("x", tensor)
        params = relax.Var("params", relax.TupleType([tensor] * n))
        # as exported: one input, then the weights, which the entry does not check one by one
        with bb.function(name, [x, params], attrs={"num_input": 1}):
            items = [bb.emit(relax.TupleGetItem(params, i)) for i in range(n)]
            if name == "first_kernel":
                bb.emit(relax.call_pure_packed(MARKER, items[0], ty_args=relax.TupleType([])))
                bb.emit_func_output(bb.emit(relax.Tuple(items[::100])))
            else:
                bb.emit_func_output(items[0])
    return bb.get()


def _build(mod: tvm.IRModule, fetch_at_first_use: bool) -> relax.VMExecutable:
    ours = fetch_params_at_first_use().info.name
    passes = [p for p in vm_lowering_passes() if fetch_at_first_use or p.info.name != ours]
    target = tvm.target.Target("llvm")
    with target:
        lowered = tvm.transform.Sequential(passes)(mod)
    return relax.build(lowered, target, relax_pipeline=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1187, help="tensors in the tuple (v8-k4096-0 7B: 1187)")
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    marked: list[float] = []
    tvm.register_global_func(MARKER, lambda _t: marked.append(time.perf_counter()) or None, override=True)
    x = tvm.runtime.tensor(np.zeros(4, "float32"))
    # one ffi Array, as the engine passes its weights (a Python list would be converted on every call)
    args = tvm_ffi.Array([tvm.runtime.tensor(np.zeros(4, "float32")) for _ in range(a.params)])
    mod = _module(a.params)
    for label, on in (("TVM's lowering", False), ("+ fetch at first use", True)):
        ex = _build(mod, on)
        fetches = ex.as_text().count("vm.builtin.tuple_getitem")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        first, table = vm["first_kernel"], vm["one_table"]
        to_marker, whole = [], []
        for _ in range(a.calls + 1):
            t0 = time.perf_counter()
            first(x, args)
            to_marker.append(marked[-1] - t0)
            t0 = time.perf_counter()
            table(x, args)
            whole.append(time.perf_counter() - t0)
        us = [float(np.median(x[1:])) * 1e6 for x in (to_marker, whole)]
        print(f"{a.params} parameters, {label}: {us[0]:.1f} us to the first kernel, {us[1]:.1f} us for a function "
              f"reading one table ({fetches} tuple_getitem instructions in the executable)")


if __name__ == "__main__":
    main()
