"""Layer split on a 2-GPU host: greedy tokens and batch-1 decode speed, one GPU vs split.

Usage on the GPU host (repo root, PYTHONPATH=ART_DIR/tvm_rt:. as bench/split_gpu.sh sets it):
    python3 bench/split_gpu.py MODEL_DIR LIB OUT_DIR [--devices cuda:0,cuda:1] [--tokens 32] [--prompt-len 128]
                               [--random-weights | --random-weights-on-device] [--skip-single] [--batch 4]
                               [--name NAME]
LIB must be compiled with `vptq-mlc compile --target cuda --split-functions`. MODEL_DIR may be config-only (no
tensor-cache.json) with --random-weights: it is copied to /tmp and filled by `write_random_weights` (what
`vptq-mlc bench random-weights` does). --random-weights-on-device (split only, implies --skip-single): no shards at
all, each stage's weights are made on its GPU (vptq_mlc/bench/device_random.py: use_random_weights_on_device), for
models bigger than the host's disk (the 405B shape). --skip-single: the model does not fit one GPU (only the split
runs). --batch N: also time N concurrent requests (decode tok/s summed over the batch).

Writes OUT_DIR/split_<name>.json: per run greedy tokens, decode tok/s (batch 1, after the prompt), prefill seconds,
load seconds, GPU memory per device (nvidia-smi) and the stage plan with its weight bytes; `identical` = split tokens
== single-device tokens. Exit status 1 when they differ.
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
from vptq_mlc.runtime.split import _param_bytes


def nvidia_smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True).stdout
    except FileNotFoundError:  # a CPU dry run (--devices cpu:0,cpu:1)
        return ""


def gpu_memory_mib() -> dict[str, int]:
    out = nvidia_smi("index,memory.used")
    return {f"cuda:{i.strip()}": int(m) for i, m in (ln.split(",") for ln in out.strip().splitlines() if ln)}


def run(engine: Engine, prompts: list[list[int]], tokens: int) -> dict:
    """Greedy `tokens` tokens for each prompt, all at once; decode tok/s counts every sequence's tokens after the
    prompts' prefill (so at batch > 1 it is the sum over the batch)."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    t0 = time.perf_counter()
    while not all(r.prefill_done for r in reqs):
        engine.step()
    t1 = time.perf_counter()
    while not all(r.finished for r in reqs):
        engine.step()
    t2 = time.perf_counter()
    out = {"prefill_s": t1 - t0, "decode_tok_s": sum(len(r.output_ids) - 1 for r in reqs) / (t2 - t1)}
    return {"tokens": reqs[0].output_ids, **out} if len(reqs) == 1 else {"batch": len(reqs), **out}


def stage_plan(engine: Engine) -> list[dict] | None:
    model = engine.lib
    stages = getattr(model, "stages", None)
    if not stages:
        return None
    cfg = engine.config.model_config
    plan = []
    for k, s in enumerate(stages):
        names = [n for i in s.layers for n in model.layer_param_names(i)]
        names += model.split["embed"]["params"] if k == 0 else []
        names += model.split["head"]["params"] if k == len(stages) - 1 else []
        plan.append({"device": f"{s.lib.spec.kind}:{s.lib.spec.index}", "layers": [s.layers.start, s.layers.stop],
                     "weight_bytes": sum(_param_bytes(model._params[n], cfg) for n in dict.fromkeys(names))})
    return plan


def measure(model: str, lib: str, prompts: list[list[int]], tokens: int, **engine_kw: object) -> dict:
    """Load, warm up, then batch 1 (prompts[0]) and, with more prompts, all of them at once."""
    per_seq = len(prompts[0]) + tokens + 16
    t = time.perf_counter()
    engine = Engine(model, lib, max_batch_size=len(prompts), context_window=per_seq,
                    max_total_tokens=per_seq * len(prompts), **engine_kw)
    load_s = time.perf_counter() - t
    res = {"load_s": load_s, "gpu_mem_mib_loaded": gpu_memory_mib()}
    run(engine, prompts[:1], 8)  # warm-up (first calls allocate the VM's memory pools)
    res.update(run(engine, prompts[:1], tokens))
    if len(prompts) > 1:
        run(engine, prompts, 4)  # warm-up of the batched functions
        res[f"batch{len(prompts)}"] = run(engine, prompts, tokens)
    res["gpu_mem_mib"] = gpu_memory_mib()
    plan = stage_plan(engine)
    if plan:
        res["stages"] = plan
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
    ap.add_argument("--random-weights-on-device", action="store_true")
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    name = a.name or Path(a.model_dir).name
    model = a.model_dir
    if a.random_weights_on_device:
        from vptq_mlc.bench.device_random import use_random_weights_on_device

        use_random_weights_on_device(seed=0)
        a.skip_single = True
    elif a.random_weights and not (Path(model) / "tensor-cache.json").exists():
        from vptq_mlc.bench.random_weights import write_random_weights
        from vptq_mlc.runtime.library import load_library

        model = f"/tmp/split-{name}"
        shutil.copytree(a.model_dir, model, dirs_exist_ok=True)
        t = time.time()
        nbytes = write_random_weights(model, load_library(a.lib, a.devices.split(",")[0]).metadata["params"])
        print(f"{nbytes / 1e9:.2f} GB of random weights in {time.time() - t:.0f} s", flush=True)
    vocab = json.loads((Path(model) / "mlc-chat-config.json").read_text())["vocab_size"]
    prompts = [[1 + (7 * j + 13 * b) % min(1000, vocab - 1) for j in range(a.prompt_len)] for b in range(a.batch)]
    out = Path(a.out_dir) / f"split_{name}.json"
    res: dict = {"model": name, "devices": a.devices, "tokens": a.tokens, "prompt_len": a.prompt_len,
                 "weights": "random on device" if a.random_weights_on_device else "shards",
                 "gpus": nvidia_smi("name").strip().splitlines(),
                 "gpu_mem_total_mib": nvidia_smi("memory.total").split()}
    if not a.skip_single:
        res["single"] = measure(model, a.lib, prompts[:1], a.tokens, device=a.devices.split(",")[0])
        print("single", {k: v for k, v in res["single"].items() if k != "tokens"}, flush=True)
        json.dump(res, open(out, "w"), indent=1)
    res["split"] = measure(model, a.lib, prompts, a.tokens, devices=a.devices)
    if res["split"].get("stages"):
        res["param_bytes"] = sum(st["weight_bytes"] for st in res["split"]["stages"])
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
