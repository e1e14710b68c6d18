"""Dense fp16 tensor-core GEMM (vptq_mlc/tir_kernels/cuda_dense_mma.py) against torch.matmul (cuBLAS) and
dlight's SIMT matmul schedule, same shapes, same run, cold L2; plus a correctness check of every output row.

Build (build box, nvcc, no GPU), from the repo root:
    PYTHONPATH=$PWD python3 bench/dense_mma.py build ART_DIR --arch sm_90 [--sweep]
Run (GPU host; torch with CUDA; a full TVM or the runtime-only bundle of `vptq-mlc runtime-bundle`):
    PYTHONPATH=TVM_RT:$PWD TVM_USE_RUNTIME_LIB=1 python3 bench/dense_mma.py run ART_DIR --out RESULT.json

`build` writes ART_DIR/dense_mma.so and ART_DIR/manifest.json: per (N, K) of Llama-2-7B (q/o 4096x4096, gate/up
11008x4096, down 4096x11008, lm_head 32000x4096) the kernel the CUDA pipeline uses (static rows 1 and 16 as in the
decode functions, symbolic rows as in prefill), dlight's schedule of the same matmul (what the pipeline used
before), and with `--sweep` other launch plans. `run` checks each against an fp32-accumulate reference
(largest per-row relative L2 error, largest absolute error) and times it against torch.matmul of the same shape
(median of REPS calls, a 512 MiB buffer read before every call so L2 is cold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096))  # (N, K)
ROWS = (1, 16, 128, 512, 2048)
STATIC_ROWS = (1, 16)  # decode functions have a static row count; prefill's is symbolic
LIBRARY = "dense_mma.so"
MANIFEST = "manifest.json"
MAX_ROW_REL_ERR = 2e-3  # fp16 output rounding is 2^-11 relative per element; a wrong tile is O(1)


def _sweep_plans():
    from vptq_mlc.tir_kernels.cuda_dense_mma import DensePlan

    decode = {
        "d_bn16_wk8_s4": DensePlan(1, 1, 8, 1, 2, 32, 4),
        "d_bn64_wk4_s4": DensePlan(1, 2, 4, 1, 4, 32, 4),
        "d_bn32_wk4_bk64_s3": DensePlan(1, 1, 4, 1, 4, 64, 3),
    }
    prefill = {
        "p_128x128_w4": DensePlan(2, 2, 1, 4, 8, 32, 4),
        "p_64x64_w4": DensePlan(2, 2, 1, 2, 4, 32, 4),
        "p_128x64_w4": DensePlan(2, 2, 1, 4, 4, 32, 4),
        "p_128x128_bk64_s3": DensePlan(2, 4, 1, 4, 4, 64, 3),
        "p_128x256_w8": DensePlan(2, 4, 1, 4, 8, 32, 3),
        "p_256x128_w8": DensePlan(4, 2, 1, 4, 8, 32, 3),
    }
    return decode, prefill


def build(out_dir: Path, archs: tuple[str, ...], sweep: bool) -> None:
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_dense_mma import dense_mma_cuda

    (bt,) = resolve_backend("cuda", ",".join(archs))
    bt.prepare()
    funcs, manifest = {}, []

    def add(name, func, n, k, rows, kind, plan="default"):
        funcs[name] = func.with_attr("global_symbol", name)
        manifest.append({"name": name, "n": n, "k": k, "rows": rows, "kind": kind, "plan": plan})

    def dlight_matmul(lead, n, k):  # int64 dims, as relax legalization makes them
        lead = tuple(tirx.IntImm("int64", d) if isinstance(d, int) else d for d in lead)
        n, k = tirx.IntImm("int64", n), tirx.IntImm("int64", k)
        x = te.placeholder(tuple(lead) + (k,), "float16", name="x")
        w = te.placeholder((n, k), "float16", name="w")
        r = te.reduce_axis((0, k), name="r")
        y = te.compute(tuple(lead) + (n,), lambda *i: te.sum(x[i[:-1] + (r,)] * w[i[-1], r], axis=r), name="y")
        return te.create_prim_func([x, w, y]).with_attr("dlight.do_not_tensorize", True)

    decode_plans, prefill_plans = _sweep_plans() if sweep else ({}, {})
    for n, k in SHAPES:
        seq = tirx.Var("seq_len", "int64")
        for r in STATIC_ROWS:
            add(f"ours_n{n}_k{k}_r{r}", dense_mma_cuda((r, 1), n, k), n, k, r, "ours")
            for pname, plan in decode_plans.items():
                if k % plan.block_k == 0:
                    add(f"{pname}_n{n}_k{k}_r{r}", dense_mma_cuda((r, 1), n, k, plan=plan), n, k, r, "sweep", pname)
        add(f"ours_n{n}_k{k}_sym", dense_mma_cuda((1, seq), n, k), n, k, None, "ours")
        for pname, plan in prefill_plans.items():
            add(f"{pname}_n{n}_k{k}_sym", dense_mma_cuda((1, tirx.Var("seq_len", "int64")), n, k, plan=plan),
                n, k, None, "sweep", pname)
        dl_mod = tvm.IRModule({
            f"dlight_n{n}_k{k}_r16": dlight_matmul((16, 1), n, k),
            f"dlight_n{n}_k{k}_sym": dlight_matmul((1, tirx.Var("seq_len", "int64")), n, k),
        })
        with bt.target:
            dl_mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Fallback())(dl_mod)
        add(f"dlight_n{n}_k{k}_r16", dl_mod[f"dlight_n{n}_k{k}_r16"], n, k, 16, "dlight")
        add(f"dlight_n{n}_k{k}_sym", dl_mod[f"dlight_n{n}_k{k}_sym"], n, k, None, "dlight")
    print(f"building {len(funcs)} functions for {','.join(archs)}", flush=True)
    lib = tvm.compile(tvm.IRModule(funcs), target=bt.target)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out_dir / LIBRARY))
    (out_dir / MANIFEST).write_text(json.dumps({"archs": list(archs), "functions": manifest}, indent=1))
    print(f"wrote {out_dir / LIBRARY}", flush=True)


def run(art_dir: Path, out: Path | None, reps: int, kinds: tuple[str, ...] = ()) -> int:
    import torch
    import tvm

    from vptq_mlc.bench.kernels import ColdL2Timer
    from vptq_mlc.runtime.device import resolve_device

    resolve_device("cuda")  # a runtime-only TVM loads its CUDA plugin only when asked
    man = json.loads((art_dir / MANIFEST).read_text())
    lib = tvm.runtime.load_module(str(art_dir / LIBRARY))
    timer = ColdL2Timer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results, failures = [], []
    print(torch.cuda.get_device_name(), flush=True)
    for n, k in SHAPES:
        w = (torch.randn((n, k), generator=gen, device="cuda", dtype=torch.float32) / k ** 0.5).half()
        for rows in ROWS:
            x = torch.randn((1, rows, k), generator=gen, device="cuda", dtype=torch.float32).half()
            ref = (x.float().reshape(rows, k) @ w.float().T)
            y_torch = torch.matmul(x, w.T)
            t_torch = timer(lambda: torch.matmul(x, w.T), reps)
            entry = {"n": n, "k": k, "rows": rows, "torch_us": round(t_torch, 2),
                     "torch_row_rel_err": _row_rel_err(y_torch.reshape(rows, n), ref)}
            for f in man["functions"]:
                if f["n"] != n or f["k"] != k or (f["rows"] is not None and f["rows"] != rows):
                    continue
                if kinds and f["kind"] not in kinds:
                    continue
                xs = x.reshape(rows, 1, k) if f["rows"] is not None else x
                y = torch.full(xs.shape[:-1] + (n,), float("nan"), device="cuda", dtype=torch.float16)
                fn = lib[f["name"]]
                args = [tvm.runtime.from_dlpack(t) for t in (xs, w, y)]
                fn(*args)
                torch.cuda.synchronize()
                err = _row_rel_err(y.reshape(rows, n), ref)
                abs_err = float((y.reshape(rows, n).float() - ref).abs().max())
                t = timer(lambda: fn(*args), reps)
                key = f["kind"] if f["kind"] != "sweep" else f["plan"]
                key += "" if f["rows"] is None else "_static"
                entry[key] = {"us": round(t, 2), "vs_torch": round(t_torch / t, 3), "row_rel_err": err,
                              "max_abs_err": abs_err}
                if f["kind"] in ("ours", "sweep") and not err <= MAX_ROW_REL_ERR:
                    failures.append(f"{f['name']} rows={rows}: row rel err {err}")
            results.append(entry)
            print(_line(entry), flush=True)
    report = {"device": torch.cuda.get_device_name(), "reps": reps, "results": results, "failures": failures}
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    for fl in failures:
        print("FAIL", fl)
    return 1 if failures else 0


def _row_rel_err(y, ref) -> float:
    """Largest per-row relative L2 error of `y` (fp16) against `ref` (fp32); NaN rows count as infinite."""
    import torch

    d = (y.float() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


def _line(e: dict) -> str:
    parts = [f"N={e['n']:5d} K={e['k']:5d} M={e['rows']:4d} torch {e['torch_us']:8.1f}us"]
    for key, v in e.items():
        if isinstance(v, dict):
            parts.append(f"{key} {v['us']:8.1f}us {v['vs_torch']:5.2f}x err {v['row_rel_err']:.1e}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("art_dir", type=Path)
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--sweep", action="store_true", help="also build the other launch plans")
    r = sub.add_parser("run")
    r.add_argument("art_dir", type=Path)
    r.add_argument("--out", type=Path)
    r.add_argument("--reps", type=int, default=30)
    r.add_argument("--kinds", default="", help="comma list of ours,dlight,sweep (default: all built)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.art_dir, tuple(a.arch.split(",")), a.sweep)
        return 0
    return run(a.art_dir, a.out, a.reps, tuple(x for x in a.kinds.split(",") if x))


if __name__ == "__main__":
    sys.exit(main())
