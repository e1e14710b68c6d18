"""Layer split on a 2-GPU host (issue 11 item 2): greedy tokens and batch-1 decode speed, one GPU vs split.

Usage on the GPU host (repo root, PYTHONPATH=.carry/tvm_rt:.):
    python3 bench/split_gpu.py MODEL_DIR LIB OUT_DIR [--devices cuda:0,cuda:1] [--tokens 32] [--prompt-len 128]
                               [--random-weights] [--skip-single] [--name NAME]
LIB must be compiled with `vptq-mlc compile --target cuda --split-functions`. MODEL_DIR may be config-only (no
tensor-cache.json) with --random-weights: it is copied to /tmp and filled by `write_random_weights` (what
`vptq-mlc bench random-weights` does). --skip-single: the model does not fit one GPU (only the split runs).

Writes OUT_DIR/split_<name>.json: per run greedy tokens, decode tok/s (batch 1, after the prompt), prefill seconds,
GPU memory per device (nvidia-smi) and the stage plan; `identical` = split tokens == single-device tokens.
Exit status 1 when they differ.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.sampling import SamplingParams


def nvidia_smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True).stdout
    except FileNotFoundError:  # a CPU dry run (--devices cpu:0,cpu:1)
        return ""


def gpu_memory_mib() -> dict[str, int]:
    out = nvidia_smi("index,memory.used")
    return {f"cuda:{i.strip()}": int(m) for i, m in (ln.split(",") for ln in out.strip().splitlines() if ln)}


def run(engine: Engine, prompt: list[int], tokens: int) -> dict:
    """Greedy `tokens` tokens for one request; decode tok/s counts the steps after the prompt's prefill."""
    req = engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    while not req.prefill_done:
        engine.step()
    t1 = time.perf_counter()
    while not req.finished:
        engine.step()
    t2 = time.perf_counter()
    return {"tokens": req.output_ids, "prefill_s": t1 - t0, "decode_tok_s": (len(req.output_ids) - 1) / (t2 - t1)}


def measure(model: str, lib: str, prompt: list[int], tokens: int, **engine_kw: object) -> dict:
    t = time.perf_counter()
    engine = Engine(model, lib, max_batch_size=1, context_window=len(prompt) + tokens + 16, **engine_kw)
    load_s = time.perf_counter() - t
    run(engine, prompt, 8)  # warm-up (first calls allocate the VM's memory pools)
    res = {"load_s": load_s, **run(engine, prompt, tokens), "gpu_mem_mib": gpu_memory_mib()}
    stages = getattr(engine.lib, "stages", None)
    if stages:
        res["stages"] = [{"device": f"{s.lib.spec.kind}:{s.lib.spec.index}", "layers": [s.layers.start, s.layers.stop]}
                         for s in stages]
    del engine
    gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("lib")
    ap.add_argument("out_dir")
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    name = a.name or Path(a.model_dir).name
    model = a.model_dir
    if a.random_weights and not (Path(model) / "tensor-cache.json").exists():
        from vptq_mlc.bench.random_weights import write_random_weights
        from vptq_mlc.runtime.library import load_library

        model = f"/tmp/split-{name}"
        shutil.copytree(a.model_dir, model, dirs_exist_ok=True)
        t = time.time()
        nbytes = write_random_weights(model, load_library(a.lib, a.devices.split(",")[0]).metadata["params"])
        print(f"{nbytes / 1e9:.2f} GB of random weights in {time.time() - t:.0f} s", flush=True)
    vocab = json.loads((Path(model) / "mlc-chat-config.json").read_text())["vocab_size"]
    prompt = [1 + (7 * j) % min(1000, vocab - 1) for j in range(a.prompt_len)]
    out = Path(a.out_dir) / f"split_{name}.json"
    res: dict = {"model": name, "devices": a.devices, "tokens": a.tokens, "prompt_len": a.prompt_len,
                 "gpus": nvidia_smi("name").strip().splitlines()}
    if not a.skip_single:
        res["single"] = measure(model, a.lib, prompt, a.tokens, device=a.devices.split(",")[0])
        print("single", {k: v for k, v in res["single"].items() if k != "tokens"}, flush=True)
        json.dump(res, open(out, "w"), indent=1)
    res["split"] = measure(model, a.lib, prompt, a.tokens, devices=a.devices)
    print("split", {k: v for k, v in res["split"].items() if k != "tokens"}, flush=True)
    if not a.skip_single:
        res["identical"] = res["split"]["tokens"] == res["single"]["tokens"]
        res["split_vs_single_decode"] = res["split"]["decode_tok_s"] / res["single"]["decode_tok_s"]
        print(f"identical greedy tokens ({a.tokens}): {res['identical']}; split/single decode "
              f"{res['split_vs_single_decode']:.3f}", flush=True)
    json.dump(res, open(out, "w"), indent=1)
    return 0 if res.get("identical", True) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
