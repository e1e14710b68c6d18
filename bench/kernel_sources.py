"""Dump the TIR and the generated CUDA source of every hand-written GPU kernel variant, to compare two trees.

Why: a refactor of the kernel modules (shared `@T.macro` pieces, helpers) must not change one instruction. This
builds every case of the kernel suites (bench/kernels.py: correctness, code-sorted with its sweep, bench shapes at
every decode row count, prefill plans), fp16 and fp32, the ROCm variant of the GEMV, the GEMV over several layers in
one launch, the CUDA prologues (a layer's own and the shared one) and the GEMV with them folded in, and
writes per kernel its TVMScript (`tir/<name>.py`) and its CUDA source (`cuda/<name>.cu`). No GPU and no nvcc: the
CUDA compile callback is replaced by one that records the source. Usage (from a worktree, PYTHONPATH set):

    python3 bench/kernel_sources.py dump OUT_DIR
    python3 bench/kernel_sources.py compare BEFORE_DIR AFTER_DIR

`compare` lists every file that differs and exits 1 when generated code differs: any CUDA source, or the TIR of a
kernel that has no CUDA here (the ROCm GEMVs). A CUDA kernel's TIR may differ while its CUDA does not (a loop
that is unrolled away, written differently); those are listed but accepted.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm


def _cases():
    from vptq_mlc.bench import kernels as kb

    cases = kb.correctness_cases() + kb.code_sorted_cases(sweep=True) + kb.sweep_cases()
    cases += kb.bench_cases(rows=(1, 2, 4, 8, 16), compare_gemv=(8,))
    cases += [
        c
        for c in kb.prefill_cases(run_rows=(128,), plans=({"unroll": 1}, {"splits": 2, "row_groups": 4}))
        if c.kernel != "dequant"
    ]  # the dlight matmul is not ours
    seen, out = set(), []
    for c in cases:
        if c.prologue:
            continue  # the same VQ kernels behind our prologues (those are dumped on their own below)
        if c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out


def _cuda_funcs(dtype: str, backend) -> dict[str, object]:
    """name -> PrimFunc, dispatched as bench/kernels.py's build_kernel_library does."""
    from vptq_mlc.artifact.vq_layout import CODE_SORTED, LAYOUT
    from vptq_mlc.tir_kernels import cuda_code_sorted as cs
    from vptq_mlc.tir_kernels.cuda_gemv import MAX_ROWS, plan_gemv, vq_gemv_cuda
    from vptq_mlc.tir_kernels.cuda_mma import plan_mma, plan_mma_prefill, vq_mma_cuda
    from vptq_mlc.tir_kernels.cuda_prologue import vq_prologue_cuda, vq_shared_prologue_cuda

    select = backend.kernel_selector((LAYOUT, CODE_SORTED))
    funcs = {}
    for c in _cases():
        cfg = c.config()
        fp16_only = ("mma", "mma-wide", "code-sorted", "dequant-gemm")
        if dtype != "float16" and c.kernel in fp16_only or c.kernel == "dequant":
            continue
        if c.kernel == "code-sorted":
            f = cs.vq_code_sorted_cuda(cfg, dtype, c.rows, replace(cs.plan_code_sorted(cfg, c.rows, dtype), **c.plan))
        elif c.kernel == "mma":
            base = plan_mma(cfg) if c.rows else plan_mma_prefill(cfg)
            f = vq_mma_cuda(cfg, dtype, c.rows, replace(base, **c.plan))
        elif c.kernel == "mma-wide":
            from vptq_mlc.tir_kernels.cuda_mma_wide import plan_mma_wide, vq_mma_wide_cuda

            base = plan_mma_wide(cfg, c.rows, c.plan.get("register_tiles", False))
            f = vq_mma_wide_cuda(cfg, dtype, c.rows, replace(base, **c.plan))
        elif c.kernel == "dequant-gemm":
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import vq_prefill_cuda

            f = vq_prefill_cuda(cfg, dtype, from_rows=0)[0]
        elif c.kernel == "fold":
            if dtype != "float16":
                continue
            from vptq_mlc.tir_kernels.cuda_dequant_gemm import DEQUANT_GEMM_FROM_ROWS, vq_prefill_folded_cuda

            f = vq_prefill_folded_cuda(cfg, dtype, cfg.bias, c.plan.get("from_rows", DEQUANT_GEMM_FROM_ROWS))[0]
        elif c.plan or c.kernel == "gemv":
            if c.rows > MAX_ROWS:
                continue
            f = vq_gemv_cuda(cfg, dtype, c.rows, replace(plan_gemv(cfg, c.rows, dtype), **c.plan))
        else:
            if c.rows is None and dtype != "float16":
                continue  # fp32 prefill: the dlight matmul, not ours
            f = select(cfg, dtype, c.rows).func
        funcs[f"{dtype}-{c.name}"] = f
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

    outl = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256}
    shared = (("v8-k4096-0", 4096, 4096, {}, 1, 3), ("v8-k256-256", 4096, 11008, {}, 1, 2),
              ("v8-k256-256", 1024, 512, outl, 4, 2), ("v8-k65536-0", 1024, 512, {}, 2, 3))
    for variant, i, o, kw, rows, count in shared:
        cfg = VPTQLayerConfig.from_variant(variant, i, o, **kw)
        name = f"{dtype}-gemv-shared{count}-{variant}-{o}x{i}-r{rows}{'-outl' if kw else ''}"
        funcs[name] = vq_gemv_cuda(cfg, dtype, rows, count=count)
    for i in (1000, 4096, 11008):
        for perm in (False, True):
            funcs[f"{dtype}-prologue-{i}-perm{int(perm)}"] = vq_prologue_cuda(i, dtype, perm)
        for perms in ((True, True, True), (True, False), (False, True, False)):
            flags = "".join("p" if p else "n" for p in perms)
            funcs[f"{dtype}-prologue-shared-{i}-{flags}"] = vq_shared_prologue_cuda(i, dtype, perms)
    # the GEMV with the prologue folded in, and its neighbours (the decoder's 7B shapes at batch 1, odd shapes)
    from vptq_mlc.tir_kernels.cuda_gemv import fused_prologue_fits
    from vptq_mlc.tir_kernels.fused_input import FusedInput

    fused = (("v8-k4096-0", 4096, 4096, {}, 1, (True, True, True), FusedInput("rmsnorm", 1e-5, concat=True)),
             ("v8-k4096-0", 4096, 4096, {}, 1, (True,), FusedInput(residual=True)),
             ("v8-k4096-0", 4096, 11008, {}, 1, (True, True), FusedInput("rmsnorm", 1e-5)),
             ("v8-k4096-0", 11008, 4096, {}, 1, (True,), FusedInput("swiglu", residual=True)),
             ("v8-k256-256", 1000, 300, {}, 2, (False, True), FusedInput()),
             ("v8-k256-256", 1024, 512, outl, 4, (True,), FusedInput("rmsnorm", 1e-6, residual=True)),
             ("v8-k65536-0", 1024, 512, {}, 3, (True, False), FusedInput("swiglu")))
    for variant, i, o, kw, rows, perms, opts in fused:
        cfg = VPTQLayerConfig.from_variant(variant, i, o, enable_norm=True, **kw)
        if fused_prologue_fits(cfg, rows, dtype):
            flags = "".join("p" if p else "n" for p in perms)
            name = (f"{dtype}-gemv-fused-{opts.source}{'-res' if opts.residual else ''}{'-cat' if opts.concat else ''}"
                    f"-{variant}-{o}x{i}-r{rows}-{flags}{'-outl' if kw else ''}")
            funcs[name] = vq_gemv_cuda(cfg, dtype, rows, prologue=perms, fused=opts)
        flags = "".join("p" if p else "n" for p in perms)
        name = (f"{dtype}-gemv-two-{opts.source}{'-res' if opts.residual else ''}{'-cat' if opts.concat else ''}"
                f"-{variant}-{o}x{i}-r{rows}-{flags}{'-outl' if kw else ''}")
        funcs[name] = vq_gemv_cuda(cfg, dtype, rows, prologue=perms, fused=opts, two_launch=True)
    if dtype == "float16":  # the tensor-core decode kernel over several layers, and its two-launch form
        from vptq_mlc.tir_kernels.cuda_mma_wide import mma_wide_supported, plan_mma_wide, vq_mma_wide_cuda

        for variant, i, o, kw, rows, perms, opts in fused:
            cfg = VPTQLayerConfig.from_variant(variant, i, o, enable_norm=True, **kw)
            rows = max(rows, 12)
            if not mma_wide_supported(cfg, dtype, rows):
                continue
            for reg in (False, True):
                plan = plan_mma_wide(cfg, rows, reg, len(perms))
                tag = f"{variant}-{o}x{i}-r{rows}-n{len(perms)}-{'reg' if reg else 'tile'}{'-outl' if kw else ''}"
                funcs[f"{dtype}-wide-layers-{tag}"] = vq_mma_wide_cuda(cfg, dtype, rows, plan, len(perms))
                flags = "".join("p" if p else "n" for p in perms)
                funcs[f"{dtype}-wide-two-{opts.source}{'-res' if opts.residual else ''}"
                      f"{'-cat' if opts.concat else ''}-{tag}-{flags}"] = vq_mma_wide_cuda(
                    cfg, dtype, rows, plan, prologue=perms, fused=opts)
    return funcs


def _rocm_funcs(dtype: str) -> dict[str, object]:
    """The GEMV with CDNA (wave64) and RDNA (wave32) parameters: TIR only (no ROCm codegen on every box)."""
    from vptq_mlc.tir_kernels.cuda_gemv import GpuParams, vq_gemv_cuda

    funcs = {}
    for warp, lds in ((64, 65536), (32, 65536)):
        params = GpuParams(
            warp_size=warp, shared_scope="shared", smem_codebook_bytes=lds, smem_total_bytes=lds, max_threads=256
        )
        from vptq_mlc.bench.kernels import correctness_cases

        for c in correctness_cases():
            if c.plan or c.kernel or c.prologue or not c.rows or c.rows > 8:
                continue
            funcs[f"rocm{warp}-{dtype}-{c.name}"] = vq_gemv_cuda(c.config(), dtype, c.rows, params=params)
    return funcs


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def dump(out_dir: Path) -> None:
    import tvm

    from vptq_mlc.compile.targets import resolve_backend

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tir").mkdir(exist_ok=True)
    (out_dir / "cuda").mkdir(exist_ok=True)
    (bt,) = resolve_backend("cuda", "sm_90")
    bt.prepare()
    sources: list[str] = []

    def record(code, *_):  # the CUDA source TVM would hand to nvcc; the returned blob is never loaded
        sources.append(str(code))
        return b"recorded"

    tvm.register_global_func("tvm_callback_cuda_compile", record, override=True)
    for dtype in ("float16", "float32"):
        funcs = _cuda_funcs(dtype, bt)
        funcs_rocm = _rocm_funcs(dtype)
        for name, f in tqdm({**funcs, **funcs_rocm}.items(), desc=f"tir {dtype}"):
            (out_dir / "tir" / f"{name}.py").write_text(f.script())
        mod = tvm.IRModule({_safe(n): f.with_attr("global_symbol", _safe(n)) for n, f in funcs.items()})
        sources.clear()
        tvm.compile(mod, target=bt.target)
        (src,) = sources
        (out_dir / f"module-{dtype}.cu").write_text(src)
        parts = re.split(r'(?=^extern "C" __global__)', src, flags=re.M)
        (out_dir / "cuda" / f"_preamble-{dtype}.cu").write_text(parts[0])
        by_func: dict[str, str] = {}
        for part in parts[1:]:  # TVM names a PrimFunc's kernels <symbol>_kernel, <symbol>_kernel_1, ...
            m = re.search(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+?)_kernel(_\d+)?\(", part)
            by_func[m.group(1)] = by_func.get(m.group(1), "") + part
        for name in funcs:
            (out_dir / "cuda" / f"{name}.cu").write_text(by_func[_safe(name)])
        print(f"{dtype}: {len(funcs)} CUDA kernels, {len(funcs_rocm)} ROCm TIR", file=sys.stderr)


def compare(before: Path, after: Path) -> int:
    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    a, b = digests(before), digests(after)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    for k in diff:
        print(f"differs: {k}" if k in a and k in b else f"only in {'before' if k in a else 'after'}: {k}")
    bad = [k for k in diff if not k.startswith("tir/") or k.startswith("tir/rocm") or k not in a or k not in b]
    print(f"{len(a)} files before, {len(b)} after, {len(diff)} differ, {len(bad)} in generated code")
    return 1 if bad or not a else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dump").add_argument("out_dir", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.out_dir)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
