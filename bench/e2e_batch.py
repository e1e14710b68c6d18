"""Batched decode throughput through the Engine (issue 7's GPU check): B concurrent requests vs one.

Usage on the GPU host: python3 bench/e2e_batch.py MODEL_DIR LIB OUT_JSON [batches...]  (weights already written,
e.g. by bench/e2e_7b.py or `vptq-mlc bench random-weights`). Prompts are 128 token ids, 64 new tokens, EOS ignored.
Decode tok/s counts only steps where every request is past its prefill.
"""

from __future__ import annotations

import json
import os
import sys
import time

from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.sampling import SamplingParams


def prompt(i: int, prompt_len: int = 128) -> list[int]:
    return [1 + (i * 7 + j) % 1000 for j in range(prompt_len)]


def agreement(engine: Engine, batch: int, new_tokens: int = 16) -> float:
    """Fraction of greedy tokens equal between `batch` requests decoded together and each decoded alone
    (different kernels / row counts sum in different orders, so fp16 near-ties may differ)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    together = [engine.add_request(prompt(i), params) for i in range(batch)]
    while engine.has_unfinished():
        engine.step()
    same = total = 0
    for i, r in enumerate(together):
        alone = engine.add_request(prompt(i), params)
        while not alone.finished:
            engine.step()
        same += sum(a == b for a, b in zip(alone.output_ids, r.output_ids))
        total += new_tokens
    return same / total


def run(engine: Engine, batch: int, prompt_len: int = 128, new_tokens: int = 64) -> dict:
    reqs = [engine.add_request(prompt(i, prompt_len),
                               SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
            for i in range(batch)]
    while any(not r.prefill_done for r in reqs):
        engine.step()
    done0, t0 = sum(len(r.output_ids) for r in reqs), time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    return {"batch": batch, "decode_tok_s": (sum(len(r.output_ids) for r in reqs) - done0) / dt}


if __name__ == "__main__":
    model, lib, out = sys.argv[1:4]
    batches = [int(b) for b in sys.argv[4:]] or [1, 16]
    engine = Engine(model, lib, device=os.environ.get("BENCH_DEVICE", "cuda"), max_batch_size=max(batches),
                    max_total_tokens=max(batches) * 208)
    run(engine, 1, new_tokens=8)  # warm-up
    results = [run(engine, b) for b in batches]
    for r in results:
        r["ratio_vs_batch1"] = r["decode_tok_s"] / results[0]["decode_tok_s"]
        print(r, flush=True)
    results.append({"greedy_token_agreement_batch8_vs_alone": agreement(engine, 8)})
    print(results[-1], flush=True)
    json.dump(results, open(out, "w"), indent=2)
