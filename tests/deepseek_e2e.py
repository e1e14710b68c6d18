"""A tiny fp16 DeepSeek-V3 end to end against transformers, split so that the GPU host needs no transformers.

The build box (`bash bench/gpu_artifacts.sh ART e2eds`) writes the checkpoint, converts and compiles it, and saves
transformers' answer (`write_reference`: greedy tokens and teacher-forced logits of DeepseekV3ForCausalLM holding the
dense dequantized weights, tests/reference_model.py) to `reference.npz`. `check_library` then compares a compiled
library, on any device, with that file using numpy and the runtime only: tests/gpu/test_deepseek_gpu.py runs it on
CUDA (and the llvm library on the GPU host's CPU as a control), tests/test_deepseek_e2e_check.py on llvm in CI.

Bound: logits within 2e-2 of the reference's logit scale, the bound tests/gpu/test_runtime_engine_gpu.py uses for
the tiny fp16 Llama on CUDA (fp16 weights and activations, fp32 accumulation in other orders than the CPU's). The
reference here is fp32 transformers, so the fp16 rounding of the whole model counts too: measured on llvm, an fp16
build of this checkpoint is within ~0.3% of the scale (docs/architectures.md), so the bound leaves ~7x headroom and
is far below what a wrong routing or rope moves (checked by hand on llvm with the same weights: plain-halves rope
50% of the scale, routed_scaling_factor 2.0 for 2.5 36%, topk_group 2 for 1 70%). An argmax may differ from the
reference's only where the reference's top-2 margin is at most twice that step's observed logit difference (a
smaller margin cannot flip under a difference of d). Free-running greedy tokens (the runtime Engine) must equal
transformers' up to the first step whose reference margin is within 4x the largest difference measured for that
library teacher-forced (2x: where a flip becomes possible; another 2x for the Engine's own prefill/batching paths,
which round differently from the teacher-forced calls); past a near-tie both runs may legitimately part. Tying the
greedy check to the measured difference rather than to the bound keeps it long: on llvm the difference is ~0.2% of
the scale, and 2x the bound would stop most rows at their first few tokens.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from cpu_pipeline import run_requests

# the qlora + interleaved yarn case of tests/test_architectures.py, in fp16 with a small vocabulary
CHECKPOINT = dict(arch="deepseek_v3", dtype="float16", num_layers=3, vocab_size=384, seed=3,
                  hf_overrides={"max_position_embeddings": 256,
                                "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64,
                                                 "mscale": 1.0, "mscale_all_dim": 0.7}})
# the same with DeepSeek-R1's per-head widths (qk_nope 128, qk_rope 64, v 128, kv_lora 512: a 576-wide latent cache
# entry, the ragged self-attention at 192 / 128), for the MLA cache's kernels at the widths R1 runs them
R1_WIDTHS = dict(CHECKPOINT, hf_overrides={**CHECKPOINT["hf_overrides"], "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                                           "qk_rope_head_dim": 64, "v_head_dim": 128})
SHAPES = {"tiny": CHECKPOINT, "r1widths": R1_WIDTHS}
# lengths 6, 41, 1 and 9: a one-token prompt, one past a KV page. On CUDA (tir_kernels/registry.py) one row and these
# four together run the GEMV decode kernel, the four repeated to 16 rows the tensor-core one.
PROMPTS = [[5, 9, 13, 200, 31, 7], list(range(20, 61)), [42], [300, 17, 250, 3, 99, 120, 8, 64, 11]]
STEPS = 16
REL_BOUND = 2e-2
CHUNK = 16  # the 41-token prompt then prefills in three chunks (16, 16, 9)


def make_checkpoint(ckpt: Path, shape: str = "tiny") -> Path:
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    return make_synthetic_checkpoint(ckpt, overwrite=True, **SHAPES[shape])


def write_reference(ckpt: Path, out: Path) -> Path:
    """transformers' greedy tokens and teacher-forced logits (fed those tokens) for every prompt -> `out` (.npz)."""
    import torch
    import transformers
    from reference_model import reference_greedy, reference_model

    model = reference_model(ckpt)
    greedy, logits = [], []
    for p in PROMPTS:
        tokens = reference_greedy(model, p, STEPS)
        with torch.no_grad():
            full = model(torch.tensor([p + tokens[:-1]])).logits[0, len(p) - 1 :].numpy()
        greedy.append(tokens)
        logits.append(full.astype(np.float32))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        np.savez_compressed(f, prompts=np.concatenate(PROMPTS).astype(np.int32),
                            prompt_lengths=np.asarray([len(p) for p in PROMPTS], np.int32),
                            greedy=np.asarray(greedy, np.int32), logits=np.stack(logits),
                            source=np.asarray(f"transformers {transformers.__version__} DeepseekV3ForCausalLM fp32"))
    return out


def load_reference(path: Path) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """(prompts, greedy [P, N], logits [P, N, V]); a missing file fails (the reference is required)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `bash bench/gpu_artifacts.sh ART e2eds`")
    z = np.load(path)
    cuts = np.cumsum(z["prompt_lengths"])[:-1]
    return [p.tolist() for p in np.split(z["prompts"], cuts)], z["greedy"], z["logits"]


def forced_logits(model_dir: Path, lib_path: Path, device: str, prompts: list[list[int]],
                  forced: np.ndarray) -> np.ndarray:
    """[B, N, V]: each prompt's prefill logits, then N - 1 decode steps of all prompts together fed `forced[:, t]`
    (one `decode` call at B 1; `batch_decode_b<B>` where the library has it, else the symbolic `batch_decode`)."""
    import tvm
    from tvm.runtime import ShapeTuple

    from vptq_mlc.runtime.kv_cache import PagedKVCache
    from vptq_mlc.runtime.library import load_library, load_params

    lib = load_library(lib_path, device)
    params = load_params(model_dir, lib)
    b, n = forced.shape
    kv = PagedKVCache(lib, b, b * 256, 64, 16)
    fn = "decode" if b == 1 else f"batch_decode_b{b}" if lib.has(f"batch_decode_b{b}") else "batch_decode"
    embed, prefill, step_fn = lib.func("embed"), lib.func("prefill"), lib.func(fn)
    reshape = tvm.get_global_func("vm.builtin.reshape")

    def emb(ids: list[int], shape: list[int]):  # noqa: ANN202
        e = embed(tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), lib.device), params)
        return reshape(e, ShapeTuple([*shape, int(e.shape[-1])]))

    out = np.zeros((b, n, lib.metadata["params"][0]["shape"][0]), np.float32)
    for i, p in enumerate(prompts):
        kv.add(i)
        with kv.forward([i], [len(p)]) as k:
            out[i, 0] = prefill(emb(p, [1, len(p)]), k, params)[0].numpy().reshape(-1)
    for t in range(1, n):
        with kv.forward(list(range(b)), [1] * b) as k:
            out[:, t] = step_fn(emb([int(x) for x in forced[:, t - 1]], [b, 1]), k, params)[0].numpy().reshape(b, -1)
    return out


def _margins(ref: np.ndarray) -> np.ndarray:
    top2 = np.sort(ref, -1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def check_logits(got: np.ndarray, ref: np.ndarray, what: str) -> float:
    """Logits within REL_BOUND of the scale; argmax equal wherever the margin exceeds twice the step's difference.
    Returns the largest absolute difference."""
    scale = float(np.abs(ref).max())
    diff = np.abs(got - ref).max(-1)
    assert float(diff.max()) <= REL_BOUND * scale, (
        f"{what}: max logit difference {diff.max():.3g} vs scale {scale:.3g} (bound {REL_BOUND} x scale)")
    flips = (got.argmax(-1) != ref.argmax(-1)) & (_margins(ref) > 2 * diff)
    assert not flips.any(), f"{what}: argmax differs away from near-ties at {np.argwhere(flips).tolist()}"
    return float(diff.max())


def check_greedy(outputs: list[list[int]], greedy: np.ndarray, ref_logits: np.ndarray, tie: float,
                 what: str) -> int:
    """Each row's tokens equal transformers' up to its first near-tie (reference top-2 margin <= `tie`); returns
    how many tokens were compared in all."""
    compared = 0
    for i, (ours, want) in enumerate(zip(outputs, greedy.tolist())):
        ties = np.flatnonzero(_margins(ref_logits[i]) <= tie)
        upto = int(ties[0]) if ties.size else len(want)
        assert ours[:upto] == want[:upto], f"{what}: prompt {i} greedy {ours} vs transformers {want} (first {upto})"
        compared += upto
    return compared


def check_gathered_experts(lib_path: Path, device: str) -> None:
    """The library reaches the routed experts only through the stacked tensors (artifact/expert_stack.py), so every
    MoE layer ran the gathered-experts kernels (tir_kernels/cuda_gather.py on CUDA) in the checks that follow."""
    from vptq_mlc.runtime.library import load_library

    names = [p["name"] for p in load_library(lib_path, device).metadata["params"]]
    stacked = {n.split(".mlp.experts.")[0] for n in names if ".mlp.experts.gate_up_proj." in n}
    per_expert = sorted(n for n in names if re.search(r"\.mlp\.experts\.\d+\.", n))
    moe_layers = CHECKPOINT["num_layers"] - 1  # the tiny config's first layer is dense
    assert len(stacked) == moe_layers and not per_expert, (
        f"{lib_path.name}: stacked experts in {sorted(stacked)}, per-expert tensors {per_expert[:3]}")


def check_chunked_and_prefix(engine: Any, prompts: list[list[int]], greedy: np.ndarray, ref: np.ndarray, tie: float,
                             what: str) -> dict[str, int]:
    """The Engine (built with a prefill chunk shorter than the longest prompt and the prefix cache) against
    transformers' greedy tokens: every prompt alone (the long one in several chunks), then every prompt again
    (where it spans a page or more, its prefix, all but the last token, is forked from the cached first run: a
    one-token prefill on a page copied mid-page), then all together. The pages must all come back."""
    from vptq_mlc.runtime import SamplingParams

    params = SamplingParams(max_tokens=greedy.shape[1], temperature=0.0, ignore_eos=True)
    compared = {}
    first = [run_requests(engine, [p], params)[0] for p in prompts]
    compared["chunked_alone_tokens"] = check_greedy(first, greedy, ref, tie, f"{what} chunked prefill alone")
    hits = engine.prefix_cache.hits
    again = [run_requests(engine, [p], params)[0] for p in prompts]
    cacheable = sum(len(p) - 1 >= engine.kv.page_size for p in prompts)  # PrefixCache reuses a page or more
    assert cacheable and engine.prefix_cache.hits - hits == cacheable, f"{what}: a repeated prompt missed the cache"
    compared["prefix_reuse_tokens"] = check_greedy(again, greedy, ref, tie, f"{what} cached prefix reused")
    compared["chunked_batched_tokens"] = check_greedy(run_requests(engine, prompts, params), greedy, ref, tie,
                                                      f"{what} chunked prefill batched")
    while engine.prefix_cache.entries:
        engine.prefix_cache.evict()
    assert engine.kv.available_pages() == engine.kv.total_pages
    return compared


def check_library(folder: Path, lib_name: str, device: str, chunked: bool = False) -> dict[str, float]:
    """Every check of one library of `folder` (model/, the library, reference.npz) on `device`; returns the
    largest logit difference relative to the scale per run and the greedy tokens compared. `chunked`: also
    `check_chunked_and_prefix` with a prefill chunk of CHUNK tokens."""
    from vptq_mlc.runtime import Engine, SamplingParams

    prompts, greedy, ref = load_reference(folder / "reference.npz")
    model_dir, lib_path = folder / "model", folder / lib_name
    check_gathered_experts(lib_path, device)
    worst = {}
    for i, p in enumerate(prompts):  # alone: prefill + `decode`
        worst[f"alone{i}"] = check_logits(forced_logits(model_dir, lib_path, device, [p], greedy[i : i + 1])[0],
                                          ref[i], f"{lib_name} prompt {i} alone")
    together = forced_logits(model_dir, lib_path, device, prompts, greedy)
    worst["batched"] = check_logits(together, ref, f"{lib_name} {len(prompts)} prompts batched")
    sixteen = forced_logits(model_dir, lib_path, device, prompts * 4, np.tile(greedy, (4, 1)))
    worst["batched16"] = check_logits(sixteen, np.tile(ref, (4, 1, 1)), f"{lib_name} 16 rows batched")
    tie = 4 * max(worst.values())
    scale = float(np.abs(ref).max())
    worst = {k: v / scale for k, v in worst.items()}
    engine = Engine(model_dir, lib_path, device=device)
    params = SamplingParams(max_tokens=greedy.shape[1], temperature=0.0, ignore_eos=True)
    alone = [run_requests(engine, [p], params)[0] for p in prompts]
    worst["greedy_alone_tokens"] = check_greedy(alone, greedy, ref, tie, f"{lib_name} engine alone")
    worst["greedy_batched_tokens"] = check_greedy(run_requests(engine, prompts, params), greedy, ref, tie,
                                                  f"{lib_name} engine batched")
    assert engine.kv.available_pages() == engine.kv.total_pages
    if chunked:
        engine = Engine(model_dir, lib_path, device=device, prefill_chunk_size=CHUNK, prefix_cache=True)
        worst.update(check_chunked_and_prefix(engine, prompts, greedy, ref, tie, lib_name))
    return worst


if __name__ == "__main__":  # python3 tests/deepseek_e2e.py checkpoint|reference FOLDER [SHAPE] (gpu_artifacts.sh)
    sys.path.insert(0, str(Path(__file__).parent))
    step, folder = sys.argv[1], Path(sys.argv[2])
    if step == "checkpoint":
        make_checkpoint(folder / "ckpt", sys.argv[3] if len(sys.argv) > 3 else "tiny")
    elif step == "reference":
        out = write_reference(folder / "ckpt", folder / "reference.npz")
        print(json.dumps({"reference": str(out), "bytes": out.stat().st_size}))
    else:
        raise SystemExit(f"unknown step {step!r} (checkpoint, reference)")
