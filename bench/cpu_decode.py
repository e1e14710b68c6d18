"""CPU greedy decode speed: our llvm library vs transformers fp32 on the same box, best of N windows.

    PYTHONPATH=$PWD python3 bench/cpu_decode.py smollm2 --tokens 64 --reps 3        # bundled SmolLM2-135M
    PYTHONPATH=$PWD python3 bench/cpu_decode.py tiny128k --tokens 32 --reps 3       # 2 layers, hidden 128, 128256 vocab

`smollm2` builds the bundled model on first use (cache: $VPTQ_MLC_CACHE) and compares it with transformers holding
the same dense model (the GGUF import the quantizer started from) in fp32. `tiny128k` is a synthetic fp16 model
(random VQ weights) with a Llama-3-sized head: the per-token cost is dominated by the 128256 x 128 fp16 head.
`--arch` builds for a portable CPU arch instead of the host's (compile/cpu.py). Prints one JSON line per system,
with the 1-minute load average before and after (this box is shared: compare numbers taken at similar load) and
the process CPU time per token (all threads), which a busy box inflates less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"


def _load() -> float:
    return os.getloadavg()[0]


def ours(model_dir: Path, lib: Path, tokens: int, reps: int) -> dict:
    from vptq_mlc.runtime.engine import Engine
    from vptq_mlc.runtime.sampling import SamplingParams

    engine = Engine(model_dir, lib, device="cpu")
    prompt = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    best, ids = float("inf"), []
    for _ in range(reps):
        req = engine.add_request(prompt, SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True))
        engine.step()  # prefill + the first token
        t0, c0 = time.perf_counter(), time.process_time()
        while not req.finished:
            engine.step()
        if (time.perf_counter() - t0) / tokens < best:
            best, cpu_s = (time.perf_counter() - t0) / tokens, (time.process_time() - c0) / tokens
        ids = req.output_ids
    return {"ms_per_token": best * 1e3, "tok_s": 1 / best, "cpu_ms_per_token": cpu_s * 1e3, "tokens": ids}


def transformers_fp32(dense_dir: Path, tokens: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, torch_dtype=torch.float32).eval()
    prompt = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    best, ids = float("inf"), []
    with torch.inference_mode():
        for _ in range(reps):
            out = model(prompt, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            ids = [int(nxt)]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(tokens):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                ids.append(int(nxt))
            if (time.perf_counter() - t0) / tokens < best:
                best, cpu_s = (time.perf_counter() - t0) / tokens, (time.process_time() - c0) / tokens
    return {"ms_per_token": best * 1e3, "tok_s": 1 / best, "cpu_ms_per_token": cpu_s * 1e3, "tokens": ids,
            "torch_threads": torch.get_num_threads()}


def _smollm2(arch: str | None) -> tuple[Path, Path, Path]:
    from vptq_mlc.bundled import DEFAULT_VARIANT, ensure_bundled_model
    from vptq_mlc.quantize.hf_import import resolve_dense_model

    model_dir, lib = ensure_bundled_model("smollm2", DEFAULT_VARIANT, arch=arch)
    return model_dir, lib, resolve_dense_model("smollm2")


def _tiny128k(work: Path, arch: str | None) -> tuple[Path, Path]:
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    ckpt = make_synthetic_checkpoint(work / "ckpt", hidden_size=128, intermediate_size=256, vocab_size=128256,
                                     dtype="float16", seed=1)
    model_dir = convert_checkpoint(ckpt, work / "mlc", dtype="float16")
    (lib,) = compile_model(model_dir, "llvm", arch=arch)
    return model_dir, lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["smollm2", "tiny128k"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arch", default=None, help="llvm --arch (default: the host's CPU)")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    print(json.dumps({"cpus": os.cpu_count(), "load_before": _load()}))
    with tempfile.TemporaryDirectory(prefix="vptq-cpu-bench-") as tmp:
        if args.model == "smollm2":
            model_dir, lib, dense = _smollm2(args.arch)
        else:
            (model_dir, lib), dense = _tiny128k(Path(tmp), args.arch), None
        ours_r = ours(model_dir, lib, args.tokens, args.reps)
        print(json.dumps({"system": "vptq-mlc", "lib": lib.name, **ours_r, "load": _load()}))
        if dense is not None and not args.no_transformers:
            hf = transformers_fp32(dense, args.tokens, args.reps)
            print(json.dumps({"system": "transformers-fp32", **hf, "load": _load()}))
            print(json.dumps({"speedup": hf["ms_per_token"] / ours_r["ms_per_token"],
                              "same_tokens": hf["tokens"][: len(ours_r["tokens"])] == ours_r["tokens"]}))


if __name__ == "__main__":
    main()
