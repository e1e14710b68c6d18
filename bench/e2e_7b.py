"""One GPU-host run of the 7B-shaped end-to-end decode comparison (issue 10), written for the `device` tool.

Our VPTQ library vs our dense fp16 library (same runtime, same model shape: the ratio isolates the kernels)
vs transformers fp16 (torch, same shape, random weights). Libraries come from config-only dirs compiled on the
build box (`vptq-mlc bench synth-model --config-only` + `vptq-mlc compile --target cuda`); weights are random
(`vptq-mlc bench random-weights`). Usage: python3 bench/e2e_7b.py ARTIFACT_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time


def gpu_mem_mib() -> int:
    """Memory this process holds on the GPU (nvidia-smi), MiB."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(int(m) for p, m in (ln.split(",") for ln in out.strip().splitlines() if ln) if int(p) == os.getpid())


def ours(art: str, name: str, results: dict) -> None:
    from vptq_mlc.bench.e2e import greedy_decode
    from vptq_mlc.bench.random_weights import write_random_weights
    from vptq_mlc.runtime.library import load_library

    lib = f"{art}/{name}-cuda.so"
    model = f"/tmp/{name}"
    shutil.copytree(f"{art}/{name}-cfg", model, dirs_exist_ok=True)
    t = time.time()
    nbytes = write_random_weights(model, load_library(lib, "cuda").metadata["params"])
    print(f"{name}: {nbytes / 1e9:.2f} GB random weights in {time.time() - t:.0f} s", flush=True)
    for ctx in (128, 500):
        run = greedy_decode(model, lib, "cuda", list(range(1, ctx + 1)), new_tokens=64, context=ctx + 80)
        results[f"{name}_ctx{ctx}"] = {"decode_tok_s": run.decode_tok_s, "prefill_s": run.prefill_s,
                                       "weight_bytes": nbytes, "gpu_mem_mib": gpu_mem_mib()}
        print(name, ctx, results[f"{name}_ctx{ctx}"], flush=True)


def transformers_fp16(results: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    for ctx in (128, 500):
        ids = torch.arange(1, ctx + 1, device="cuda")[None]
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            t = time.time()
            model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
            torch.cuda.synchronize()
            t1 = time.time() - t
            t = time.time()
            model.generate(ids, max_new_tokens=65, min_new_tokens=65, do_sample=False)
            torch.cuda.synchronize()
            dt = time.time() - t - t1
        results[f"transformers_fp16_ctx{ctx}"] = {"decode_tok_s": 64 / dt, "prefill_s": t1,
                                                  "gpu_mem_mib": torch.cuda.max_memory_allocated() >> 20}
        print("transformers", ctx, results[f"transformers_fp16_ctx{ctx}"], flush=True)


if __name__ == "__main__":
    art, out = sys.argv[1], sys.argv[2]
    results: dict = {"gpu": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()}
    which = sys.argv[3:] or ["vq", "fp16", "hf"]
    for name in which:
        try:
            transformers_fp16(results) if name == "hf" else ours(art, name, results)
        except Exception as e:  # noqa: BLE001 - record and go on to the next system
            results[f"{name}_error"] = repr(e)
            print(name, "failed:", repr(e), flush=True)
        json.dump(results, open(out, "w"), indent=2)
