"""Call every kernel of a `vptq-mlc bench build` library a few times, for a profiler (ncu) to attach to.

Usage on the GPU host: ncu --clock-control none --set full -k regex:'^k[0-9]' python3 bench/ncu_kernels.py ART
Operands are random (uniform codes, like real VPTQ codes); no timing here: ncu measures each launch.
"""

from __future__ import annotations

import sys

import torch

from vptq_mlc.bench.kernels import CudaKernels, _random_operands, _tvm, call_spec


def main(art: str, calls: int = 2) -> None:
    lib = CudaKernels(art)
    dtype = lib.manifest["dtype"]
    tdt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    for i, c in enumerate(lib.cases):
        cfg = c.config()
        names, scratch = call_spec(lib.manifest, i, cfg)
        ops = _random_operands(cfg, dtype, gen)
        xs = torch.randn(c.n(), cfg.in_features, device="cuda", generator=gen).to(tdt)
        y = torch.empty(c.n(), cfg.out_features, dtype=tdt, device="cuda")
        tmp = [torch.empty(sh, dtype=getattr(torch, dt), device="cuda") for sh, dt in scratch]
        args = [_tvm(xs), *(_tvm(ops[nm]) for nm in names), *(_tvm(t) for t in tmp), _tvm(y)]
        for _ in range(calls):
            lib.func(i)(*args)
        w = torch.randn(cfg.out_features, cfg.in_features, device="cuda", generator=gen).to(tdt)
        torch.matmul(xs, w.T)  # the fp16 GEMV of the same shape, profiled next to ours
        torch.cuda.synchronize()
        print(f"k{i}: {c.name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
