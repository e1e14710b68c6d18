"""The gathered-experts CUDA kernel (tir_kernels/cuda_gather.py) at DeepSeek-R1's expert shapes, split by where each
half runs: `build` (build box: TVM compiler + nvcc) compiles one kernel per case into gathered_cuda.so +
gathered.json; `check` (GPU host: runtime-only TVM + torch) fills the stacked operands with random codes and
codebooks on the GPU, runs each case at its row counts and compares every (row, slot) output with the stacked layout's
definition computed in torch (artifact/expert_stack.py, docs/ARCHITECTURE.md: matrix m's vector row i reads code row
m*N + i, its group g codebook row m*G + g; outliers likewise), then times it with a cold L2.
`bash bench/gpu_artifacts.sh ART kgather` builds; tests/gpu/test_gathered_gpu.py (`VPTQ_MLC_GPU_GATHER`) checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LIBRARY, MANIFEST = "gathered_cuda.so", "gathered.json"
OUTL = {"outlier_size": 64, "outlier_vector_len": 4, "num_outlier_centroids": 256, "group_num": 2}
# name -> (variant, in, out, layer kwargs, matrices, slots, row counts to run)
CASES = {
    # small: residual + outliers + 2 groups, 16 matrices, 4 slots (the mixed-config CPU test's kinds of layer)
    "small-v8-k256-256-outliers": ("v8-k256-256", 1024, 512, OUTL, 16, 4, (1, 3, 37)),
    # R1 (2-bit + 256 residual): gate+up of 256 experts (512 matrices), 8 experts per token -> 16 slots
    "r1-gate_up-v8-k65536-256": ("v8-k65536-256", 7168, 2048, {}, 512, 16, (1, 8)),
    # R1 down: 256 matrices, 8 slots
    "r1-down-v8-k65536-256": ("v8-k65536-256", 2048, 7168, {}, 256, 8, (1, 8)),
    "r1-gate_up-v8-k65536-0": ("v8-k65536-0", 7168, 2048, {}, 512, 16, (1, 8)),
    # a stack past 2^31 code elements (1200 x 256 x 7168): the kernel's offsets switch to int64
    "int64-offsets-v8-k65536-0": ("v8-k65536-0", 7168, 2048, {}, 1200, 16, (1, 8)),
}
# largest relative L2 error of one output row: fp16 operands, fp32 accumulation (bench/kernels.py's bound)
ROW_REL_ERR_MAX = 2e-3


def _config(case: tuple) -> Any:
    from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

    variant, i_f, o_f, kw = case[:4]
    return VPTQLayerConfig.from_variant(variant, i_f, o_f, **kw)


def build(out_dir: Path, arch: str = "sm_90") -> Path:
    import tvm

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_gather import vq_gathered_cuda

    (bt,) = resolve_backend("cuda", arch)
    bt.prepare()
    funcs = {}
    for i, case in enumerate(CASES.values()):
        f = vq_gathered_cuda(_config(case), "float16", case[4], case[5])
        funcs[f"g{i}"] = f.with_attr("global_symbol", f"g{i}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tvm.compile(tvm.IRModule(funcs), target=bt.target).export_library(str(out_dir / LIBRARY))
    (out_dir / MANIFEST).write_text(json.dumps({"arch": arch, "cases": list(CASES)}, indent=1))
    return out_dir / LIBRARY


def _operands(cfg: Any, matrices: int, gen: Any, device: str = "cuda") -> dict[str, Any]:
    """Random stacked operands on `device`, in call order (codes below their codebook sizes)."""
    import torch

    from vptq_mlc.artifact.expert_stack import stacked_operand_shapes

    ops = {}
    sizes = {"codes": cfg.num_centroids, "res_codes": cfg.num_res_centroids, "outlier_codes": cfg.num_outlier_centroids}
    for name, (shape, dt) in stacked_operand_shapes(cfg, matrices).items():
        if dt == "float":
            ops[name] = (torch.randn(shape, device=device, generator=gen) * 0.05).half()
        elif dt == "uint16":  # through int16 (same bits): torch's uint16 has few kernels
            codes = torch.randint(0, sizes[name], shape, device=device, generator=gen, dtype=torch.int32)
            ops[name] = codes.to(torch.int16).view(torch.uint16)
            del codes
        else:
            ops[name] = torch.randint(0, sizes[name], shape, device=device, generator=gen, dtype=torch.int32).to(
                getattr(torch, dt))
    return ops


def _index(codes: Any) -> Any:
    """Codes as int64 indices (uint16 read back through int16)."""
    import torch

    return codes.view(torch.int16).long() & 0xFFFF if codes.dtype == torch.uint16 else codes.long()


def _reference(cfg: Any, ops: dict[str, Any], m: int, xs: Any) -> Any:
    """W[m] @ xs in float64 from the layout's definition: Wpre[i*v + j, osz + k] = C[m*G + k // S, codes[m*N + i, k], j]
    (+ the residual term), Wpre[r, ko] = Co[m*Ko + ocodes[m*No + r // vo, ko], r % vo] for the outlier columns."""
    import torch

    v, g, s, nv = cfg.vector_len, cfg.group_num, cfg.group_size, cfg.num_vectors
    k = torch.arange(g * s, device=xs.device)
    grp = (m * g + k // s)[None, :]
    codes = _index(ops["codes"][m * nv:(m + 1) * nv])  # [N, L]
    w = ops["centroids"][grp, codes].double()  # [N, L, v]
    if cfg.has_residual:
        w = w + ops["res_centroids"][grp, _index(ops["res_codes"][m * nv:(m + 1) * nv])].double()
    wpre = w.permute(0, 2, 1).reshape(nv * v, g * s)[: cfg.out_features]
    y = xs[..., cfg.outlier_size:].double() @ wpre.T
    if cfg.has_outliers:
        vo, no, ko = cfg.outlier_vector_len, cfg.num_outlier_vectors, cfg.num_outlier_centroids
        r = torch.arange(cfg.out_features, device=xs.device)
        oc = _index(ops["outlier_codes"])[m * no + r // vo]  # [O, osz] (CUDA cannot index a uint16 tensor)
        wo = ops["outlier_centroids"][m * ko + oc, (r % vo)[:, None]].double()
        y = y + xs[..., : cfg.outlier_size].double() @ wo.T
    return y


def check(art_dir: Path, seed: int = 0, reps: int = 30) -> list[dict[str, Any]]:
    """Per case and row count: worst per-(row, slot) relative L2 error, NaNs, median time (cold L2) and the bytes
    the selected matrices' codes and the activations take (a lower bound of what the kernel reads)."""
    import torch
    import tvm
    import tvm_ffi

    from vptq_mlc.bench.kernels import ColdL2Timer
    from vptq_mlc.runtime.device import resolve_device

    resolve_device("cuda")  # loads TVM's CUDA plugin in runtime-only mode
    manifest = json.loads((art_dir / MANIFEST).read_text())
    mod = tvm.runtime.load_module(str(art_dir / LIBRARY))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    timer = ColdL2Timer()
    out = []
    for i, name in enumerate(manifest["cases"]):
        case = CASES[name]
        cfg, matrices, slots = _config(case), case[4], case[5]
        ops = _operands(cfg, matrices, gen)
        fn = mod[f"g{i}"]
        for n in case[6]:
            xs = torch.randn(n, slots, cfg.in_features, device="cuda", generator=gen).half()
            mat = torch.randint(0, matrices, (n, slots), device="cuda", generator=gen, dtype=torch.int32)
            mat[:, -1] = matrices - 1  # the last matrix: the largest offsets into the stack
            y = torch.full((n, slots, cfg.out_features), float("nan"), device="cuda", dtype=torch.float16)
            args = [tvm_ffi.from_dlpack(t) for t in (xs, mat, *ops.values(), y)]
            fn(*args)
            torch.cuda.synchronize()
            err, nan = 0.0, bool(torch.isnan(y).any())
            for b in range(n):
                for t in range(slots):
                    ref = _reference(cfg, ops, int(mat[b, t]), xs[b, t])
                    err = max(err, float((y[b, t].double() - ref).norm() / ref.norm()))
            us = timer(lambda: fn(*args), reps=reps)
            code_bytes = sum(a.element_size() * a.shape[1] * cfg.num_vectors for k, a in ops.items()
                             if k in ("codes", "res_codes"))
            moved = n * slots * code_bytes + xs.numel() * 2 + y.numel() * 2
            out.append({"case": name, "rows": n, "slots": slots, "rel_err": err, "nan": nan,
                        "ok": err <= ROW_REL_ERR_MAX and not nan, "us": us, "min_bytes": moved,
                        "GB_per_s": moved / us / 1e3})
        del ops
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":  # python3 tests/gathered_kernels.py build FOLDER [ARCH] (bench/gpu_artifacts.sh)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] == "build":
        print(build(Path(sys.argv[2]), *(sys.argv[3:4] or ["sm_90"])))
    elif sys.argv[1] == "check":
        for r in check(Path(sys.argv[2])):
            print(json.dumps(r))
    else:
        raise SystemExit(f"unknown step {sys.argv[1]!r} (build, check)")
