"""The paged-KV prefill attention on CUDA: ours (split over the cached length for short chunks,
tir_kernels/cuda_attention_split_kv.py; tensor cores for chunks over 64 tokens, cuda_attention_mma.py), ours with the
CUDA-core tile loop for every chunk, and TVM's `TIRPagedKVCache` kernel; then our tensor-core ragged prefill kernel
against TVM's. All are checked against a float64 numpy reference and timed in the same run (cold L2: a buffer
larger than L2 is read before every call).

Build box (TVM compiler + nvcc): python3 bench/attention_prefill.py build OUT_DIR [--arch sm_90]
GPU host (runtime-only TVM + torch): python3 bench/attention_prefill.py run OUT_DIR --json RESULT.json
`run` exits 1 when any output row of any kernel misses the reference (relative L2 error per (token, head) row
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
OURS, THEIRS = "batch_prefill_paged_kv_split", "batch_prefill_paged_kv"
OURS_SIMT = "batch_prefill_paged_kv_split_simt"  # ours with chunks over 64 tokens on the CUDA-core tile loop
RAGGED_OURS, RAGGED_THEIRS = "batch_prefill_ragged_kv_tc", "batch_prefill_ragged_kv"


@dataclass(frozen=True)
class Case:
    """Sequences of one call: new tokens (queries) and cached tokens (paged keys/values) per sequence."""

    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    causal: int = 0


CASES = (
    Case("16 new over 1024 cached", (16,), (1024,)),
    Case("16 new over 4096 cached", (16,), (4096,)),
    Case("64 new over 1024 cached", (64,), (1024,)),
    Case("1 new over 1000 cached, x8", (1,) * 8, (1000,) * 8),
    Case("mixed: 5/1/40 new over 0/37/300", (5, 1, 40), (0, 37, 300)),
    Case("causal 16 over 1024", (16,), (1024,), causal=1),
    Case("512 new over 512 cached (unsplit)", (512,), (512,)),
    Case("100 new over 2000 cached (unsplit)", (100,), (2000,), causal=1),
    # chunks over 64 tokens: the tensor-core kernel
    Case("256 new, causal over 0 cached", (256,), (256,), causal=1),
    Case("512 new over 1536 cached, causal", (512,), (2048,), causal=1),
    Case("2048 new over 2048, causal", (2048,), (2048,), causal=1),
    Case("mixed: 70/1/200 new over 0/500/1000", (70, 1, 200), (0, 500, 1000)),
    Case("mixed causal: 65/3/130 over 65/40/1130", (65, 3, 130), (65, 40, 1130), causal=1),
)
# the ragged kernel: every sequence's new tokens over themselves (kv_lens = q_lens)
RAGGED_CASES = (
    Case("ragged 512, causal", (512,), (512,), causal=1),
    Case("ragged 2048, causal", (2048,), (2048,), causal=1),
    Case("ragged 16, causal", (16,), (16,), causal=1),
    Case("ragged 100/300/7, causal", (100, 300, 7), (100, 300, 7), causal=1),
    Case("ragged 256, not causal", (256,), (256,)),
)


def build(out: Path, arch: str) -> None:
    import tvm
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill, _attention_prefill_ragged

    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.tir_kernels.cuda_attention_mma import ragged_prefill_tc
    from vptq_mlc.tir_kernels.cuda_attention_split_kv import paged_prefill_split_kv

    (bt,) = resolve_backend("cuda", arch)
    bt.prepare()
    out.mkdir(parents=True, exist_ok=True)
    for h_kv, h_q in HEADS:
        theirs = _attention_prefill(h_kv, h_q, D, "float16", False, {}, bt.target, page_size=PAGE)
        simt = paged_prefill_split_kv(h_kv, h_q, D, "float16", PAGE, tensor_cores=False)
        mod = tvm.IRModule({OURS: paged_prefill_split_kv(h_kv, h_q, D, "float16", PAGE).with_attr(
            "global_symbol", OURS), OURS_SIMT: simt.with_attr("global_symbol", OURS_SIMT),
            THEIRS: theirs.with_attr("global_symbol", THEIRS),
            RAGGED_OURS: ragged_prefill_tc(h_kv, h_q, D, "float16").with_attr("global_symbol", RAGGED_OURS),
            RAGGED_THEIRS: _attention_prefill_ragged(h_kv, h_q, D, D, "float16", {}, bt.target).with_attr(
                "global_symbol", RAGGED_THEIRS)})
        lib = tvm.compile(mod, target=bt.target)
        lib.export_library(str(out / f"attn_h{h_kv}_{h_q}.so"))
        print(f"built {out / f'attn_h{h_kv}_{h_q}.so'}")


def make_inputs(case: Case, h_kv: int, h_q: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random q and pages; each sequence's pages scattered over the pool in a random order."""
    n_pages = [-(-k // PAGE) for k in case.kv_lens]
    pool = sum(n_pages) + 3
    order = rng.permutation(pool)
    page_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    page_values = order[: page_indptr[-1]].astype(np.int32)
    last = np.array([k - (n - 1) * PAGE if n else 0 for k, n in zip(case.kv_lens, n_pages)], np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    return {
        "q": rng.standard_normal((int(q_indptr[-1]), h_q, D)).astype(np.float16),
        "q_indptr": q_indptr,
        "pages": rng.standard_normal((pool, 2, h_kv, PAGE, D)).astype(np.float16),
        "page_indptr": page_indptr,
        "page_values": page_values,
        "length_info": last,
    }


def reference(x: dict[str, np.ndarray], case: Case, h_kv: int, h_q: int, sm_scale: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 attention of every new token over its sequence's cached tokens: (output, log2-sum-exp, valid row
    mask). Rows that see no cached token are left out of the comparison (their result is a convention)."""
    total = int(x["q_indptr"][-1])
    out = np.zeros((total, h_q, D))
    lse = np.zeros((total, h_q))
    valid = np.zeros((total, h_q), bool)
    group = h_q // h_kv
    for b, (qo, kv) in enumerate(zip(case.q_lens, case.kv_lens)):
        pages = x["page_values"][x["page_indptr"][b]: x["page_indptr"][b + 1]]
        kv_idx = np.arange(kv)
        k = x["pages"][pages[kv_idx // PAGE], 0, :, kv_idx % PAGE].astype(np.float64)  # [kv, h_kv, D]
        v = x["pages"][pages[kv_idx // PAGE], 1, :, kv_idx % PAGE].astype(np.float64)
        q0 = int(x["q_indptr"][b])
        for i in range(qo):
            limit = kv - qo + i + 1 if case.causal else kv
            if limit <= 0:
                continue
            for h in range(h_q):
                s = k[:limit, h // group] @ x["q"][q0 + i, h].astype(np.float64) * sm_scale
                m = s.max()
                p = np.exp(s - m)
                out[q0 + i, h] = p @ v[:limit, h // group] / p.sum()
                lse[q0 + i, h] = (m + np.log(p.sum())) / np.log(2)
                valid[q0 + i, h] = True
    return out, lse, valid


def _measure(f, call, o, s, ref, timer, reps: int) -> dict:
    """Call `f(*call)` once and compare its output `o` and lse `s` with `ref` = (output, lse, valid rows); then
    the median of `reps` cold-L2 timed calls."""
    import torch

    ref_o, ref_lse, valid = ref
    f(*call)
    torch.cuda.synchronize()
    got_o, got_lse = o.numpy().astype(np.float64), s.numpy().astype(np.float64)
    err = (np.linalg.norm(got_o - ref_o, axis=-1) / np.maximum(np.linalg.norm(ref_o, axis=-1), 1e-6))
    err = float(err[valid].max()) if valid.any() else 0.0
    lse_err = float(np.abs(got_lse - ref_lse)[valid].max()) if valid.any() else 0.0
    return {"ms": timer(lambda: f(*call), reps) / 1e3, "max_row_rel_err": err, "max_lse_err": lse_err,
            "ok": err <= 2e-3 and lse_err <= 2e-3}


def _report(row: dict, label: str) -> None:
    parts = [f"{label} {row['case']:40s}"]
    for key in ("ours", "ours_simt", "tvm"):
        if key in row:
            r = row[key]
            parts.append(f"{key} {r['ms']:8.4f} ms (err {r['max_row_rel_err']:.1e} {'ok' if r['ok'] else 'FAIL'})")
    parts.append(f"tvm/ours {row['tvm_over_ours']:.2f}x")
    print("  ".join(parts), flush=True)


def ragged_inputs(x: dict[str, np.ndarray], case: Case) -> dict[str, np.ndarray]:
    """The ragged kernel's k and v (each sequence's keys in a row, [total, h_kv, D]) from `make_inputs`' pages."""
    ks, vs = [], []
    for b, kv in enumerate(case.kv_lens):
        pages = x["page_values"][x["page_indptr"][b]: x["page_indptr"][b + 1]]
        idx = np.arange(kv)
        ks.append(x["pages"][pages[idx // PAGE], 0, :, idx % PAGE])
        vs.append(x["pages"][pages[idx // PAGE], 1, :, idx % PAGE])
    kv_indptr = np.concatenate([[0], np.cumsum(case.kv_lens)]).astype(np.int32)
    return {"k": np.concatenate(ks), "v": np.concatenate(vs), "kv_indptr": kv_indptr}


def run(art: Path, json_out: Path | None, reps: int) -> int:
    import torch
    import tvm

    from vptq_mlc.bench.script import gpu_run_setup

    dev, timer = gpu_run_setup(art, [f"attn_h{h_kv}_{h_q}.so" for h_kv, h_q in HEADS], "attention_prefill.py")
    rng = np.random.default_rng(0)
    sm_scale = D ** -0.5
    rows = []
    for h_kv, h_q in HEADS:
        lib = tvm.runtime.load_module(str(art / f"attn_h{h_kv}_{h_q}.so"))
        for kind, cases in (("paged", CASES), ("ragged", RAGGED_CASES)):
            for case in cases:
                x = make_inputs(case, h_kv, h_q, rng)
                ref = reference(x, case, h_kv, h_q, sm_scale)
                total = int(x["q_indptr"][-1])
                if kind == "ragged":
                    x.update(ragged_inputs(x, case))
                args = {k: tvm.runtime.tensor(v, dev) for k, v in x.items()}
                k_rope = tvm.runtime.tensor(np.zeros(len(case.q_lens), np.int32), dev)
                q_rope = tvm.runtime.tensor(np.zeros(total, np.int32), dev)
                row = {"kernel": kind, "heads": [h_kv, h_q], "case": case.name, "q_lens": case.q_lens,
                       "kv_lens": case.kv_lens, "causal": case.causal}
                names = ({"ours": OURS, "ours_simt": OURS_SIMT, "tvm": THEIRS} if kind == "paged"
                         else {"ours": RAGGED_OURS, "tvm": RAGGED_THEIRS})
                for key, name in names.items():
                    o = tvm.runtime.tensor(np.zeros((total, h_q, D), np.float16), dev)
                    s = tvm.runtime.tensor(np.zeros((total, h_q), np.float32), dev)
                    if kind == "paged":
                        call = [args["q"], args["q_indptr"], args["pages"], args["page_indptr"], args["page_values"],
                                args["length_info"], k_rope, q_rope, o, s, case.causal, 0, 1.0, 1e4, sm_scale]
                    else:
                        call = [args["q"], args["q_indptr"], args["k"], args["v"], args["kv_indptr"], q_rope, k_rope,
                                o, s, case.causal, 0, 1.0, 1e4, sm_scale]
                    row[key] = _measure(lib[name], call, o, s, ref, timer, reps)
                row["tvm_over_ours"] = row["tvm"]["ms"] / row["ours"]["ms"]
                rows.append(row)
                _report(row, f"{kind} h{h_kv}/{h_q}")
    result = {"gpu": torch.cuda.get_device_name(), "reps": reps, "cold_l2": True, "rows": rows,
              "command": "python3 bench/attention_prefill.py run ART --json OUT"}
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))
    failed = [r for r in rows if not all(r[k]["ok"] for k in ("ours", "ours_simt", "tvm") if k in r)]
    worst = max(r[k]["max_row_rel_err"] for r in rows for k in ("ours", "ours_simt", "tvm") if k in r)
    print(f"{len(rows) - len(failed)}/{len(rows)} cases within the bound; worst row error {worst:.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    from vptq_mlc.bench.script import build_run_main

    build_run_main(__doc__, build, run)
