"""Dense fp16 prefill GEMM on Hopper: our wgmma kernel (tir_kernels/cuda_wgmma.py, sm_90a) next to torch.matmul
(cuBLAS), our mma.sync pipeline plan (cuda_dense_mma.py) and the pipeline of a VPTQ_MLC_WGMMA=1 build (the same
PrimFunc with wgmma past the mma.sync plans) of the same shape, same run, cold L2, with a per-row check of every
output against an fp32-accumulate reference.

Build (build box, nvcc, no GPU), from the repo root:
    PYTHONPATH=$PWD python3 bench/wgmma_gemm.py build ART_DIR
Run (GPU host: torch with CUDA, a full TVM or the runtime-only bundle; an sm_90 GPU):
    PYTHONPATH=TVM_RT:$PWD TVM_USE_RUNTIME_LIB=1 python3 bench/wgmma_gemm.py run ART_DIR --out RESULT.json

Shapes: the Llama-2-7B prefill linears (N x K: 4096x4096, 11008x4096, 4096x11008, 12288x4096 = fused q/k/v,
32000x4096 = lm_head) at 512 and 2048 rows, timed; rows 77 and 2047 (partial row tiles) checked only. One small
case (128 x 256 x 64) also saves its operands and output (debug.npz) so a wrong fragment or swizzle layout can be
found offline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (32000, 4096))  # (N, K)
TIMED_ROWS = (512, 2048)
CHECK_ROWS = (77, 2047)
DEBUG_SHAPE = (128, 256, 64)  # rows, N, K
LIBRARY = "wgmma_gemm.so"
MANIFEST = "manifest.json"
MAX_ROW_REL_ERR = 1e-3
PIPELINES = ("mma_pipeline", "wgmma_pipeline")  # run with every --plans selection
ARCH = "sm_90a"


def _wgmma_plans():
    from vptq_mlc.tir_kernels.cuda_wgmma import WgmmaPlan

    return {  # (consumer warpgroups, BN, stages, producer warpgroup, group_m)
        "wg2_n256_s4": WgmmaPlan(2, 256, 4),
        "ws_wg2_n256_s4": WgmmaPlan(2, 256, 4, True),
        "wg2_n256_s4_g8": WgmmaPlan(2, 256, 4, False, 8),
        "ws_wg2_n256_s4_g8": WgmmaPlan(2, 256, 4, True, 8),
        "wg2_n128_s6_g8": WgmmaPlan(2, 128, 6, False, 8),
        "ws_wg2_n128_s6_g8": WgmmaPlan(2, 128, 6, True, 8),
        "wg1_n256_s5": WgmmaPlan(1, 256, 5),
    }


def build(out_dir: Path) -> None:
    import tvm
    from tvm import tirx

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_dense_mma import dense_mma_cuda
    from vptq_mlc.tir_kernels.cuda_wgmma import dense_wgmma_cuda

    (bt,) = resolve_backend("cuda", ARCH)
    bt.prepare()
    funcs, manifest = {}, []

    def add(name, func, **info):
        funcs[name] = func.with_attr("global_symbol", name)
        manifest.append({"name": name, **info})

    rows = tirx.Var("seq_len", "int64")
    for n, k in SHAPES:
        add(f"gemm_n{n}_k{k}_mma_pipeline", dense_mma_cuda((1, rows), n, k), n=n, k=k, plan="mma_pipeline")
        # what a VPTQ_MLC_WGMMA=1 build runs: mma.sync plans for few rows, the default wgmma plan past them
        add(f"gemm_n{n}_k{k}_wgmma_pipeline", dense_mma_cuda((1, rows), n, k, wgmma=True), n=n, k=k,
            plan="wgmma_pipeline")
        for pname, plan in _wgmma_plans().items():
            add(f"gemm_n{n}_k{k}_{pname}", dense_wgmma_cuda((1, rows), n, k, plan=plan), n=n, k=k, plan=pname)
    dm, dn, dk = DEBUG_SHAPE
    for pname, plan in _wgmma_plans().items():
        add(f"debug_{pname}", dense_wgmma_cuda((1, dm), dn, dk, plan=plan), n=dn, k=dk, plan=pname, debug=True)
    print(f"building {len(funcs)} functions for {ARCH}", flush=True)
    t0 = time.time()
    lib = tvm.compile(tvm.IRModule(funcs), target=bt.target)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out_dir / LIBRARY))
    (out_dir / MANIFEST).write_text(json.dumps({"arch": ARCH, "functions": manifest}, indent=1))
    print(f"wrote {out_dir / LIBRARY} in {time.time() - t0:.0f} s", flush=True)


def _row_err(y, ref) -> float:
    import torch

    d = (y.float() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    return float(torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d).max())


def run(art_dir: Path, out: Path | None, reps: int, plans: tuple[str, ...] = (), debug_only: bool = False) -> int:
    """Check and time every function of the manifest (only `plans` and the mma.sync pipeline when `plans` is
    given); the JSON report is rewritten after every shape, so a run cut short keeps what it measured."""
    import numpy as np
    import torch
    import tvm

    from vptq_mlc.bench.kernels import ColdL2Timer
    from vptq_mlc.runtime.device import resolve_device

    resolve_device("cuda")
    man = json.loads((art_dir / MANIFEST).read_text())
    lib = tvm.runtime.load_module(str(art_dir / LIBRARY))
    timer = ColdL2Timer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    print(dev_name, flush=True)
    results, failures = [], []

    def report():
        rep = {"device": dev_name, "reps": reps, "flush": "read 512 MiB before each call",
               "max_row_rel_err": MAX_ROW_REL_ERR, "results": results, "failures": failures}
        if out is not None:
            out.write_text(json.dumps(rep, indent=1))

    funcs = [f for f in man["functions"] if not plans or f["plan"] in plans + PIPELINES]
    out_dir = out.parent if out is not None else art_dir

    def tv(t):
        return tvm.runtime.from_dlpack(t)

    def call(fname, x, w, rows, n):
        y = torch.full((1, rows, n), float("nan"), device="cuda", dtype=torch.float16)
        fn = lib[fname]
        args = [tv(x), tv(w), tv(y)]
        fn(*args)
        torch.cuda.synchronize()
        return y.reshape(rows, n), fn, args

    # the small case first: its output is saved whatever happens later
    dm, dn, dk = DEBUG_SHAPE
    x = torch.randn((1, dm, dk), generator=gen, device="cuda", dtype=torch.float32).half()
    w = (torch.randn((dn, dk), generator=gen, device="cuda", dtype=torch.float32) / dk ** 0.5).half()
    ref = x.float().reshape(dm, dk) @ w.float().T
    saved = {"x": x.reshape(dm, dk).cpu().numpy(), "w": w.cpu().numpy()}
    for f in funcs:
        if not f.get("debug"):
            continue
        try:
            y, _, _ = call(f["name"], x, w, dm, dn)
        except Exception as e:  # noqa: BLE001 - report and go on: one broken kernel must not hide the others
            failures.append(f"{f['name']}: {type(e).__name__}: {e}"[:400])
            print("FAIL", failures[-1], flush=True)
            continue
        saved[f["plan"]] = y.cpu().numpy()
        np.savez_compressed(out_dir / ("debug.npz" if not plans else f"debug_{'_'.join(plans)}.npz"), **saved)
        err = _row_err(y, ref)
        results.append({"kind": "debug", "plan": f["plan"], "row_rel_err": err})
        print(f"debug {f['plan']} {dm}x{dn}x{dk}: row rel err {err:.3g}", flush=True)
        if not err <= MAX_ROW_REL_ERR:
            failures.append(f"{f['name']}: row rel err {err}")
    report()
    if debug_only:
        return 1 if failures else 0

    for n, k in SHAPES:
        w = (torch.randn((n, k), generator=gen, device="cuda", dtype=torch.float32) / k ** 0.5).half()
        fs = [f for f in funcs if f["n"] == n and f["k"] == k and not f.get("debug")]
        for rows in CHECK_ROWS + TIMED_ROWS:
            timed = rows in TIMED_ROWS
            x = torch.randn((1, rows, k), generator=gen, device="cuda", dtype=torch.float32).half()
            ref = x.float().reshape(rows, k) @ w.float().T
            entry = {"kind": "gemm", "n": n, "k": k, "rows": rows}
            if timed:
                t_torch = timer(lambda: torch.matmul(x, w.T), reps)
                entry.update(torch_us=round(t_torch, 2), torch_tflops=round(2 * rows * n * k / t_torch / 1e6, 1),
                             torch_row_rel_err=_row_err(torch.matmul(x, w.T).reshape(rows, n), ref))
            for f in fs:
                try:
                    y, fn, args = call(f["name"], x, w, rows, n)
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{f['name']} rows={rows}: {type(e).__name__}: {e}"[:400])
                    print("FAIL", failures[-1], flush=True)
                    continue
                err = _row_err(y, ref)
                res = {"row_rel_err": err}
                if timed:
                    t = timer(lambda: fn(*args), reps)
                    res.update(us=round(t, 2), vs_torch=round(t_torch / t, 3),
                               tflops=round(2 * rows * n * k / t / 1e6, 1))
                entry[f["plan"]] = res
                if not err <= MAX_ROW_REL_ERR:
                    failures.append(f"{f['name']} rows={rows}: row rel err {err}")
            results.append(entry)
            done = {kk: v for kk, v in entry.items() if isinstance(v, dict)}
            if timed:
                print(f"gemm {n}x{k} M={rows} torch {t_torch:.1f}us ({entry['torch_tflops']} TF/s) | " + " ".join(
                    f"{kk}:{v.get('vs_torch', 0):.2f}x(err {v['row_rel_err']:.1e})" for kk, v in done.items()),
                    flush=True)
            else:
                print(f"check {n}x{k} M={rows} | " + " ".join(
                    f"{kk}:err {v['row_rel_err']:.1e}" for kk, v in done.items()), flush=True)
        report()
    for fl in failures:
        print("FAIL", fl)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("art_dir", type=Path)
    r = sub.add_parser("run")
    r.add_argument("art_dir", type=Path)
    r.add_argument("--out", type=Path)
    r.add_argument("--reps", type=int, default=20)
    r.add_argument("--plans", default="", help="comma list of wgmma plans to run (default: all)")
    r.add_argument("--debug-only", action="store_true", help="only the small case (saved to debug*.npz)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.art_dir)
        return 0
    return run(a.art_dir, a.out, a.reps, tuple(p for p in a.plans.split(",") if p), a.debug_only)


if __name__ == "__main__":
    sys.exit(main())
