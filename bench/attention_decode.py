"""The paged-KV decode attention on CUDA: ours (split over the cached length, tir_kernels/cuda_attention_decode.py)
against TVM 0.27's `batch_decode_paged_kv` and torch's F.scaled_dot_product_attention over contiguous K/V (the
gather from pages left out: a lower bound for torch). Every output row of ours and TVM's is checked against a
float64 numpy attention; all are timed in the same run, cold L2 (a buffer larger than L2 is read before every call,
so host launch time hides behind it and the events time the kernels alone).

Build box (TVM compiler + nvcc): python3 bench/attention_decode.py build OUT_DIR [--arch sm_90]
GPU host (runtime-only TVM + torch): python3 bench/attention_decode.py run OUT_DIR --json RESULT.json
`run` exits 1 when any output row of ours or TVM's misses the reference (relative L2 error per (sequence, head) row
<= 2e-3, log2-sum-exp within 2e-3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE = 16
D = 128
HEADS = ((32, 32), (8, 32), (4, 32))  # (kv heads, query heads): Llama-2-7B, Llama-3.1-8B, group size 8
OURS, THEIRS = "batch_decode_paged_kv_split", "batch_decode_paged_kv"
# ours built with other split bounds or unroll (timed and checked too): what the defaults are chosen from
VARIANTS = {"ours_1split": {"max_splits": 1}, "ours_slice64": {"min_slice_keys": 64},
            "ours_slice128": {"min_slice_keys": 128}, "ours_unroll2": {"unroll": 2}}


@dataclass(frozen=True)
class Case:
    """Cached lengths (the new token included, as the runtime calls decode after appending it) per sequence."""

    name: str
    kv_lens: tuple[int, ...]


CASES = (
    Case("batch 1, context 128", (128,)),
    Case("batch 1, context 2048", (2048,)),
    Case("batch 16, context 128", (128,) * 16),
    Case("batch 16, context 2048", (2048,) * 16),
    Case("batch 1, context 8192", (8192,)),
    Case("batch 4, context 512", (512,) * 4),
    Case("batch 3, contexts 1/7/1000", (1, 7, 1000)),
    Case("batch 16, mixed contexts", (1, 7, 128, 1000, 1500, 33, 64, 65, 2, 300, 17, 16, 4000, 90, 1, 511)),
)


def build(out: Path, arch: str) -> None:
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_attention_decode import paged_decode_split_kv

    (bt,) = resolve_backend("cuda", arch)
    bt.prepare()
    out.mkdir(parents=True, exist_ok=True)
    for h_kv, h_q in HEADS:
        theirs = _attention_decode(h_kv, h_q, D, "float16", False, {}, bt.target, page_size=PAGE)
        funcs = {OURS: paged_decode_split_kv(h_kv, h_q, D, "float16", PAGE), THEIRS: theirs}
        for name, kw in VARIANTS.items():
            funcs[name] = paged_decode_split_kv(h_kv, h_q, D, "float16", PAGE, **kw)
        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
        lib = tvm.compile(mod, target=bt.target)
        lib.export_library(str(out / f"decode_h{h_kv}_{h_q}.so"))
        print(f"built {out / f'decode_h{h_kv}_{h_q}.so'}")


def make_inputs(case: Case, h_kv: int, h_q: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random q and pages; each sequence's pages scattered over the pool in a random order."""
    n_pages = [-(-k // PAGE) for k in case.kv_lens]
    pool = sum(n_pages) + 3
    order = rng.permutation(pool)
    page_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([k - (n - 1) * PAGE if n else 0 for k, n in zip(case.kv_lens, n_pages)], np.int32)
    return {
        "q": rng.standard_normal((len(case.kv_lens), h_q, D)).astype(np.float16),
        "pages": rng.standard_normal((pool, 2, h_kv, PAGE, D)).astype(np.float16),
        "page_indptr": page_indptr,
        "page_values": order[: page_indptr[-1]].astype(np.int32),
        "length_info": last,
    }


def reference(x: dict[str, np.ndarray], case: Case, h_kv: int, h_q: int, sm_scale: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 attention of every sequence's query over its cached keys: (output, log2-sum-exp, valid rows)."""
    batch = len(case.kv_lens)
    out = np.zeros((batch, h_q, D))
    lse = np.zeros((batch, h_q))
    valid = np.zeros((batch, h_q), bool)
    group = h_q // h_kv
    for b, kv in enumerate(case.kv_lens):
        if kv == 0:
            continue
        pages = x["page_values"][x["page_indptr"][b]: x["page_indptr"][b + 1]]
        idx = np.arange(kv)
        k = x["pages"][pages[idx // PAGE], 0, :, idx % PAGE].astype(np.float64)  # [kv, h_kv, D]
        v = x["pages"][pages[idx // PAGE], 1, :, idx % PAGE].astype(np.float64)
        for h in range(h_q):
            s = k[:, h // group] @ x["q"][b, h].astype(np.float64) * sm_scale
            m = s.max()
            p = np.exp(s - m)
            out[b, h] = p @ v[:, h // group] / p.sum()
            lse[b, h] = (m + np.log(p.sum())) / np.log(2)
            valid[b, h] = True
    return out, lse, valid


def _check(f, o, s, ref) -> dict:
    import torch

    ref_o, ref_lse, valid = ref
    f()
    torch.cuda.synchronize()
    got_o, got_lse = o.numpy().astype(np.float64), s.numpy().astype(np.float64)
    err = np.linalg.norm(got_o - ref_o, axis=-1) / np.maximum(np.linalg.norm(ref_o, axis=-1), 1e-6)
    err = float(err[valid].max()) if valid.any() else 0.0
    lse_err = float(np.abs(got_lse - ref_lse)[valid].max()) if valid.any() else 0.0
    finite = bool(np.isfinite(got_o).all() and np.isfinite(got_lse).all())
    return {"max_row_rel_err": err, "max_lse_err": lse_err, "ok": finite and err <= 2e-3 and lse_err <= 2e-3}


def _torch_sdpa(x: dict[str, np.ndarray], case: Case, h_kv: int, h_q: int, sm_scale: float):
    """F.scaled_dot_product_attention over contiguous [batch, heads, kv, D] K/V (equal lengths only), or None."""
    import torch
    import torch.nn.functional as F

    if len(set(case.kv_lens)) != 1:
        return None
    kv = case.kv_lens[0]
    ks, vs = [], []
    for b in range(len(case.kv_lens)):
        pages = x["page_values"][x["page_indptr"][b]: x["page_indptr"][b + 1]]
        idx = np.arange(kv)
        ks.append(x["pages"][pages[idx // PAGE], 0, :, idx % PAGE].transpose(1, 0, 2))
        vs.append(x["pages"][pages[idx // PAGE], 1, :, idx % PAGE].transpose(1, 0, 2))
    k = torch.tensor(np.stack(ks), device="cuda")
    v = torch.tensor(np.stack(vs), device="cuda")
    q = torch.tensor(x["q"][:, :, None, :], device="cuda")
    gqa = h_q != h_kv
    return lambda: F.scaled_dot_product_attention(q, k, v, scale=sm_scale, enable_gqa=gqa)


def run(art: Path, json_out: Path | None, reps: int) -> int:
    import torch
    import tvm

    from vptq_mlc.bench.script import gpu_run_setup

    dev, timer = gpu_run_setup(art, [f"decode_h{h_kv}_{h_q}.so" for h_kv, h_q in HEADS], "attention_decode.py")
    rng = np.random.default_rng(0)
    sm_scale = D ** -0.5
    rows = []
    for h_kv, h_q in HEADS:
        lib = tvm.runtime.load_module(str(art / f"decode_h{h_kv}_{h_q}.so"))
        for case in CASES:
            x = make_inputs(case, h_kv, h_q, rng)
            ref = reference(x, case, h_kv, h_q, sm_scale)
            batch = len(case.kv_lens)
            args = {k: tvm.runtime.tensor(v, dev) for k, v in x.items()}
            rope = tvm.runtime.tensor(np.zeros(batch, np.int32), dev)
            row = {"heads": [h_kv, h_q], "case": case.name, "kv_lens": case.kv_lens,
                   "kv_bytes": int(sum(case.kv_lens)) * h_kv * D * 2 * 2}
            for key, name in (("ours", OURS), ("tvm", THEIRS), *((v, v) for v in VARIANTS)):
                o = tvm.runtime.tensor(np.zeros((batch, h_q, D), np.float16), dev)
                s = tvm.runtime.tensor(np.zeros((batch, h_q), np.float32), dev)
                call = [args["q"], args["pages"], args["page_indptr"], args["page_values"], args["length_info"],
                        rope, rope, o, s, 0, 1.0, 1e4, sm_scale]
                f = lib[name]
                row[key] = _check(lambda f=f, call=call: f(*call), o, s, ref)
                row[key]["ms"] = timer(lambda f=f, call=call: f(*call), reps) / 1e3
                row[key]["gb_per_s"] = row["kv_bytes"] / row[key]["ms"] / 1e6
            sdpa = _torch_sdpa(x, case, h_kv, h_q, sm_scale)
            if sdpa is not None:
                row["torch_sdpa_ms"] = timer(sdpa, reps) / 1e3
            row["tvm_over_ours"] = row["tvm"]["ms"] / row["ours"]["ms"]
            rows.append(row)
            print(f"h{h_kv}/{h_q} {case.name:28s} ours {row['ours']['ms'] * 1e3:8.1f} us "
                  f"({row['ours']['gb_per_s']:6.0f} GB/s, err {row['ours']['max_row_rel_err']:.1e} "
                  f"{'ok' if row['ours']['ok'] else 'FAIL'})  tvm {row['tvm']['ms'] * 1e3:8.1f} us "
                  f"(err {row['tvm']['max_row_rel_err']:.1e} {'ok' if row['tvm']['ok'] else 'FAIL'})  "
                  f"torch sdpa {row.get('torch_sdpa_ms', float('nan')) * 1e3:8.1f} us  "
                  f"tvm/ours {row['tvm_over_ours']:.2f}x  variants "
                  + " ".join(f"{v} {row[v]['ms'] * 1e3:.1f}{'' if row[v]['ok'] else ' FAIL'}" for v in VARIANTS),
                  flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "reps": reps, "cold_l2": True, "rows": rows,
              "command": "python3 bench/attention_decode.py run ART --json OUT"}
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    failed = [r for r in rows if not all(r[k]["ok"] for k in ("ours", "tvm", *VARIANTS))]
    worst = max(r[k]["max_row_rel_err"] for r in rows for k in ("ours", "tvm"))
    print(f"{len(rows) - len(failed)}/{len(rows)} cases within the bound; worst row error {worst:.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    from vptq_mlc.bench.script import build_run_main

    build_run_main(__doc__, build, run)
