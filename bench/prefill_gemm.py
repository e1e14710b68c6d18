"""Prefill building blocks on CUDA, each against its own yardstick in the same run, cold L2: the VQ dequantize
kernels, plain and folding (GB/s of fp16 weight written, against a device copy's bandwidth) and dense GEMM launch
plans (against torch.matmul, i.e. cuBLAS, of the same shape), with a correctness check of every kernel.

Build (build box, nvcc, no GPU), from the repo root:
    PYTHONPATH=$PWD python3 bench/prefill_gemm.py build ART_DIR --arch sm_90 [--only dequant|fold|gemm]
Run (GPU host; torch with CUDA; a full TVM or the runtime-only bundle):
    PYTHONPATH=TVM_RT:$PWD TVM_USE_RUNTIME_LIB=1 python3 bench/prefill_gemm.py run ART_DIR --out RESULT.json

Dequantize: Llama-2-7B shapes (out x in: 4096x4096, 11008x4096, 4096x11008) for v8-k4096-0, v8-k256-256 and
v8-k65536-256, every launch plan that fits (codebooks through L1/L2, or in shared memory with several CTA shapes);
each output compared with torch's gather of the same codebooks (bit for bit but for the fp16 rounding of
main + residual entry, checked to one ulp). Folding dequantize (`dequant_fold_macro`: permutation, column scale
and norm bias folded in, final column order): the same shapes and variants with a permutation, the pipeline's launch
shape (`plan_fold`) next to other thread counts and vector rows per CTA, checked against torch's gather, scale and
scatter to one ulp. GEMM: the same shapes plus lm_head (32000x4096) at 512 and 2048 rows, the pipeline's plan and
the sweep's; each output row within MAX_ROW_REL_ERR of an fp32-accumulate reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DQ_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in) = (N, K)
GEMM_SHAPES = DQ_SHAPES + ((32000, 4096),)
DQ_VARIANTS = ("v8-k4096-0", "v8-k256-256", "v8-k65536-256")
GEMM_ROWS = (512, 2048)
LIBRARY = "prefill_gemm.so"
MANIFEST = "manifest.json"
MAX_ROW_REL_ERR = 2e-3
SM90_MAX_SMEM = 227 * 1024


def _dequant_plans():
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import DequantPlan

    return {
        "l1": DequantPlan(),
        "smem_t256_r1": DequantPlan(256, 1, True),
        "smem_t256_r4": DequantPlan(256, 4, True),
        "smem_t512_r4": DequantPlan(512, 4, True),
        "smem_t1024_r8": DequantPlan(1024, 8, True),
        "smem_t512_r16": DequantPlan(512, 16, True),
    }


def _fold_plans():
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import FoldPlan

    return {"t256_r1": FoldPlan(256, 1), "t256_r2": FoldPlan(256, 2), "t384_r1": FoldPlan(384, 1),
            "t512_r1": FoldPlan(512, 1), "t128_r1": FoldPlan(128, 1), "t384_r2": FoldPlan(384, 2)}


def _gemm_plans():
    from vptq_mlc.tir_kernels.cuda_dense_mma import DensePlan

    P = DensePlan
    return {  # (WM, WN, WK, MT, NT, BK, stages[, group_m])
        "cur_128x128_bk64_s3": P(2, 4, 1, 4, 4, 64, 3),
        "cur_g4": P(2, 4, 1, 4, 4, 64, 3, 4),
        "cur_g16": P(2, 4, 1, 4, 4, 64, 3, 16),
        "128x128_bk64_s4": P(2, 4, 1, 4, 4, 64, 4),
        "128x128_bk32_s5": P(2, 4, 1, 4, 4, 32, 5),
        "128x128_w4_bk64_s3": P(2, 2, 1, 4, 8, 64, 3),
        "128x128_w4_bk32_s4": P(2, 2, 1, 4, 8, 32, 4),
        "128x256_w8_bk32_s4": P(2, 4, 1, 4, 8, 32, 4),
        "128x256_w8_bk32_s4_g16": P(2, 4, 1, 4, 8, 32, 4, 16),
        "128x256_w8_bk64_s3_g16": P(2, 4, 1, 4, 8, 64, 3, 16),
        "256x128_w8_bk32_s4_g16": P(4, 2, 1, 4, 8, 32, 4, 16),
        "128x128_bk64_s4_g16": P(2, 4, 1, 4, 4, 64, 4, 16),
        # more CTAs for short prompts (512 rows x 4096 outputs is 128 tiles of 128 x 128: one per SM)
        "64x128_w4_bk64_s3": P(1, 4, 1, 4, 4, 64, 3),
        "128x64_w4_bk64_s3": P(2, 2, 1, 4, 4, 64, 3),
        "64x64_w4_bk32_s4": P(2, 2, 1, 2, 4, 32, 4),
        "64x128_w4_bk64_s4": P(1, 4, 1, 4, 4, 64, 4),
        "128x128_w16_bk32_s4": P(4, 4, 1, 2, 4, 32, 4),
        "64x256_w8_bk32_s4": P(1, 8, 1, 4, 4, 32, 4),
    }


def build(out_dir: Path, archs: tuple[str, ...], only: str) -> None:
    import tvm
    from tvm import tirx

    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_dense_mma import dense_mma_cuda
    from vptq_mlc.tir_kernels.cuda_dequant_gemm import (
        MAX_DYN_SMEM,
        fold_smem_bytes,
        plan_fold,
        smem_book_bytes,
        vq_dequantize_func,
        vq_fold_dequantize_func,
    )

    (bt,) = resolve_backend("cuda", ",".join(archs))
    bt.prepare()
    funcs, manifest = {}, []
    if only in ("", "dequant"):
        for var in DQ_VARIANTS:
            for o, i in DQ_SHAPES:
                cfg = VPTQLayerConfig.from_variant(var, i, o)
                for pname, plan in _dequant_plans().items():
                    if plan.smem_book and smem_book_bytes(cfg) is None:
                        continue
                    name = f"dq_{var.replace('-', '_')}_o{o}_i{i}_{pname}"
                    funcs[name] = vq_dequantize_func(cfg, "float16", plan=plan).with_attr("global_symbol", name)
                    manifest.append({"name": name, "kind": "dequant", "variant": var, "n": o, "k": i, "plan": pname})
    if only in ("", "fold"):
        for var in DQ_VARIANTS:
            for o, i in DQ_SHAPES:
                cfg = VPTQLayerConfig.from_variant(var, i, o, enable_norm=True, enable_perm=True)
                pipeline = plan_fold(cfg, True)  # a sweep shape equal to it would be the same kernel again
                plans = {"pipeline": pipeline, **{k: p for k, p in _fold_plans().items() if p != pipeline}}
                for pname, plan in plans.items():
                    if fold_smem_bytes(cfg, True, plan) > MAX_DYN_SMEM:
                        continue
                    name = f"fold_{var.replace('-', '_')}_o{o}_i{i}_{pname}"
                    f = vq_fold_dequantize_func(cfg, "float16", plan=plan)
                    funcs[name] = f.with_attr("global_symbol", name)
                    manifest.append({"name": name, "kind": "fold", "variant": var, "n": o, "k": i, "plan": pname,
                                     "params": [p.name for p in f.params][:-1],
                                     "threads": plan.threads, "rows_per_cta": plan.rows_per_cta})
    if only in ("", "gemm"):
        for n, k in GEMM_SHAPES:
            name = f"gemm_n{n}_k{k}_pipeline"
            funcs[name] = dense_mma_cuda((1, tirx.Var("seq_len", "int64")), n, k).with_attr("global_symbol", name)
            manifest.append({"name": name, "kind": "gemm", "n": n, "k": k, "plan": "pipeline"})
            for pname, plan in _gemm_plans().items():
                if k % plan.block_k:
                    continue
                name = f"gemm_n{n}_k{k}_{pname}"
                f = dense_mma_cuda((1, tirx.Var("seq_len", "int64")), n, k, plan=plan, max_smem=SM90_MAX_SMEM)
                funcs[name] = f.with_attr("global_symbol", name)
                manifest.append({"name": name, "kind": "gemm", "n": n, "k": k, "plan": pname})
    print(f"building {len(funcs)} functions for {','.join(archs)}", flush=True)
    t0 = time.time()
    lib = tvm.compile(tvm.IRModule(funcs), target=bt.target)
    out_dir.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out_dir / LIBRARY))
    (out_dir / MANIFEST).write_text(json.dumps({"archs": list(archs), "functions": manifest}, indent=1))
    print(f"wrote {out_dir / LIBRARY} in {time.time() - t0:.0f} s", flush=True)


def _dequant_reference(cfg, ops):
    """W[i*v + j, c] = centroids[c // S, codes[i, c], j] (+ the residual entry, in fp16) by torch gathers."""
    import torch

    v, s = cfg.vector_len, cfg.group_size
    nv, cols = ops["codes"].shape
    grp = (torch.arange(cols, device=ops["codes"].device) // s)[None, :].expand(nv, cols)
    w = ops["centroids"][grp, ops["codes"].long()]  # [NV, L, v]
    if cfg.has_residual:
        w = w + ops["res_centroids"][grp, ops["res_codes"].long()]
    return w.permute(0, 2, 1).reshape(nv * v, cols)[: cfg.out_features]


def _fold_norm_operands(cols: int, gen) -> dict:
    """A layer's permutation, column scale (of realistic spread) and norm bias, on `gen`'s device."""
    import torch

    dev = gen.device
    return {"perm": torch.randperm(cols, device=dev, generator=gen).to(torch.int32),
            "col_scale": (torch.rand(cols, device=dev, generator=gen) * 0.18 + 0.02).half(),
            "weight_bias": (torch.randn(cols, device=dev, generator=gen) * 0.01).half()}


def _fold_reference(cfg, ops):
    """The final-order folded weight by torch: `w[:, perm[k]] = fp16(fp16(W[:, k] * scale[k]) + wb[perm[k]])`."""
    import torch

    w = _dequant_reference(cfg, ops)
    perm = ops["perm"].long()
    scaled = (w.float() * ops["col_scale"].float()).half()
    out = torch.empty_like(w)
    out[:, perm] = (scaled.float() + ops["weight_bias"][perm].float()).half()
    return out


def run(art_dir: Path, out: Path | None, reps: int, kinds: tuple[str, ...]) -> int:
    import torch
    import tvm

    from vptq_mlc.bench.kernels import ColdL2Timer, _random_operands, copy_bandwidth
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
    from vptq_mlc.runtime.device import resolve_device

    resolve_device("cuda")
    man = json.loads((art_dir / MANIFEST).read_text())
    lib = tvm.runtime.load_module(str(art_dir / LIBRARY))
    timer = ColdL2Timer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbps = copy_bandwidth()
    dev_name = torch.cuda.get_device_name()
    print(dev_name, f"copy {copy_gbps:.0f} GB/s (read + written)", flush=True)
    results, failures = [], []

    def tv(t):
        return tvm.runtime.from_dlpack(t)

    def weight_kernel(fn, operands: list, ref) -> tuple[float, int, float]:
        """Run a kernel writing a weight like `ref` (into a NaN-filled buffer), then time it: (us, elements beyond
        one ulp of `ref` or NaN, fraction equal to `ref`)."""
        w = torch.full(tuple(ref.shape), float("nan"), device="cuda", dtype=torch.float16)
        args = [tv(t) for t in operands] + [tv(w)]
        fn(*args)
        torch.cuda.synchronize()
        diff = (w.float() - ref.float()).abs()
        ulp = ref.float().abs().clamp_min(2 ** -14) * 2 ** -10
        bad = int((diff > ulp).sum()) + int(torch.isnan(w).sum())
        return timer(lambda: fn(*args), reps), bad, float((diff == 0).float().mean())

    if not kinds or "dequant" in kinds:
        groups: dict[tuple, list] = {}
        for f in man["functions"]:
            if f["kind"] == "dequant":
                groups.setdefault((f["variant"], f["n"], f["k"]), []).append(f)
        for (var, o, i), fs in groups.items():
            cfg = VPTQLayerConfig.from_variant(var, i, o)
            ops = _random_operands(cfg, "float16", gen)
            ref = _dequant_reference(cfg, ops)
            out_bytes = o * i * 2
            in_bytes = sum(t.numel() * t.element_size() for t in ops.values())
            t_copy = timer(lambda: ref.clone(), reps)  # the same bytes as a device copy, same cold L2
            entry = {"kind": "dequant", "variant": var, "n": o, "k": i, "bytes_written": out_bytes,
                     "bytes_operands": in_bytes, "clone_us": round(t_copy, 2)}
            for f in fs:
                t, bad, exact = weight_kernel(lib[f["name"]], [ops[n] for n in ops], ref)
                entry[f["plan"]] = {"us": round(t, 2), "GBps_written": round(out_bytes / t / 1e3, 1),
                                    "vs_clone": round(t_copy / t, 3), "exact_frac": exact, "beyond_1ulp": bad}
                if bad:
                    failures.append(f"{f['name']}: {bad} elements beyond one ulp of torch's gather")
            results.append(entry)
            print(" | ".join([f"dequant {var} {o}x{i} clone {t_copy:.1f}us"] + [
                f"{k} {v['us']:.1f}us {v['GBps_written']:.0f}GB/s {v['vs_clone']:.2f}x bad {v['beyond_1ulp']}"
                for k, v in entry.items() if isinstance(v, dict)]), flush=True)

    if not kinds or "fold" in kinds:
        groups = {}
        for f in man["functions"]:
            if f["kind"] == "fold":
                groups.setdefault((f["variant"], f["n"], f["k"]), []).append(f)
        for (var, o, i), fs in groups.items():
            cfg = VPTQLayerConfig.from_variant(var, i, o, enable_norm=True, enable_perm=True)
            ops = {**_random_operands(cfg, "float16", gen), **_fold_norm_operands(i, gen)}
            ref = _fold_reference(cfg, ops)
            out_bytes = o * i * 2
            t_copy = timer(lambda: ref.clone(), reps)
            entry = {"kind": "fold", "variant": var, "n": o, "k": i, "bytes_written": out_bytes,
                     "clone_us": round(t_copy, 2)}
            for f in fs:
                t, bad, _ = weight_kernel(lib[f["name"]], [ops[n] for n in f["params"]], ref)
                entry[f["plan"]] = {"us": round(t, 2), "GBps_written": round(out_bytes / t / 1e3, 1),
                                    "vs_clone": round(t_copy / t, 3), "threads": f["threads"],
                                    "rows_per_cta": f["rows_per_cta"], "beyond_1ulp": bad}
                if bad:
                    failures.append(f"{f['name']}: {bad} elements beyond one ulp of torch's folded gather")
            results.append(entry)
            print(" | ".join([f"fold {var} {o}x{i} clone {t_copy:.1f}us"] + [
                f"{k} {v['us']:.1f}us bad {v['beyond_1ulp']}" for k, v in entry.items() if isinstance(v, dict)]),
                flush=True)

    if not kinds or "gemm" in kinds:
        shapes = sorted({(f["n"], f["k"]) for f in man["functions"] if f["kind"] == "gemm"})
        for n, k in shapes:
            w = (torch.randn((n, k), generator=gen, device="cuda", dtype=torch.float32) / k ** 0.5).half()
            for rows in GEMM_ROWS:
                x = torch.randn((1, rows, k), generator=gen, device="cuda", dtype=torch.float32).half()
                ref = x.float().reshape(rows, k) @ w.float().T
                t_torch = timer(lambda: torch.matmul(x, w.T), reps)
                entry = {"kind": "gemm", "n": n, "k": k, "rows": rows, "torch_us": round(t_torch, 2),
                         "torch_tflops": round(2 * rows * n * k / t_torch / 1e6, 1)}
                for f in man["functions"]:
                    if f["kind"] != "gemm" or f["n"] != n or f["k"] != k:
                        continue
                    y = torch.full((1, rows, n), float("nan"), device="cuda", dtype=torch.float16)
                    fn = lib[f["name"]]
                    args = [tv(x), tv(w), tv(y)]
                    fn(*args)
                    torch.cuda.synchronize()
                    d = (y.reshape(rows, n).float() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)
                    err = float(torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d).max())
                    t = timer(lambda: fn(*args), reps)
                    entry[f["plan"]] = {"us": round(t, 2), "vs_torch": round(t_torch / t, 3),
                                        "tflops": round(2 * rows * n * k / t / 1e6, 1), "row_rel_err": err}
                    if not err <= MAX_ROW_REL_ERR:
                        failures.append(f"{f['name']} rows={rows}: row rel err {err}")
                results.append(entry)
                best = max((v["vs_torch"], kk) for kk, v in entry.items() if isinstance(v, dict))
                print(f"gemm {n}x{k} M={rows} torch {t_torch:.1f}us ({entry['torch_tflops']} TF/s) | pipeline "
                      f"{entry['pipeline']['vs_torch']:.2f}x | best {best[1]} {best[0]:.2f}x", flush=True)
                print("   " + " ".join(f"{kk}:{v['vs_torch']:.2f}" for kk, v in entry.items()
                                       if isinstance(v, dict)), flush=True)
    report = {"device": dev_name, "copy_GBps_read_plus_written": round(copy_gbps, 1), "reps": reps,
              "flush": "read 512 MiB before each call", "results": results, "failures": failures}
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    for fl in failures:
        print("FAIL", fl)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("art_dir", type=Path)
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--only", choices=("dequant", "fold", "gemm"), default="")
    r = sub.add_parser("run")
    r.add_argument("art_dir", type=Path)
    r.add_argument("--out", type=Path)
    r.add_argument("--reps", type=int, default=20)
    r.add_argument("--kinds", default="", help="comma list of dequant,fold,gemm (default: all)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.art_dir, tuple(a.arch.split(",")), a.only)
        return 0
    return run(a.art_dir, a.out, a.reps, tuple(x for x in a.kinds.split(",") if x))


if __name__ == "__main__":
    sys.exit(main())
