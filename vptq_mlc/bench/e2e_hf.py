"""The transformers baseline of `vptq-mlc bench e2e`: the same model shape with random dense weights, greedy
`generate`, on the same grid as our libraries. Needs torch + transformers (never the TVM runtime).

One generate() call per (batch, context) with 1 + warmup + steps new tokens (EOS suppressed by min_new_tokens);
a streamer stamps the time each token is ready (synchronised), and decode tok/s = batch * steps / the time of the
last `steps` tokens, as for our engine. Prefill tok/s = prompt tokens / time from the generate() call to the first
new token (median of reps after one untimed call of that shape).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.bench.e2e_common import Grid, Recorder, decode_prompt_len, prompt_ids

log = logging.getLogger(__name__)


def hf_config(chat: dict[str, Any]) -> Any:
    """A transformers config with the shapes of an mlc-chat-config.json (config-only dirs have no config.json)."""
    from transformers import AutoConfig

    mc = chat["model_config"]
    kw = {
        "hidden_size": mc["hidden_size"], "intermediate_size": mc["intermediate_size"],
        "num_hidden_layers": mc["num_hidden_layers"], "num_attention_heads": mc["num_attention_heads"],
        "num_key_value_heads": mc.get("num_key_value_heads") or mc["num_attention_heads"],
        "vocab_size": mc["vocab_size"], "rms_norm_eps": mc.get("rms_norm_eps", 1e-6),
        "rope_theta": mc.get("position_embedding_base", 10000.0),
        "tie_word_embeddings": bool(mc.get("tie_word_embeddings", False)),
        "max_position_embeddings": chat.get("context_window_size") or mc["context_window_size"],
    }
    if mc.get("head_dim"):
        kw["head_dim"] = mc["head_dim"]
    if chat["model_type"] == "llama":
        kw["attention_bias"] = bool(mc.get("attention_bias", False))
    if mc.get("rope_scaling"):
        kw["rope_scaling"] = mc["rope_scaling"]
    return AutoConfig.for_model(chat["model_type"], **kw)


def run_hf_system(model_dir: str, device: str, dtype: str, grid: Grid, rec: Recorder) -> None:
    """The grid for transformers with random `dtype` weights of `model_dir`'s shape on `device`, into `rec.out`
    (same order as e2e_engine.run_engine_system)."""
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    chat = ChatConfig.load(model_dir).to_json()
    config = hf_config(chat)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    with dev:  # initialise the random weights on the device (a 7B fp16 model in seconds)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    out = rec.out
    out.update({"weights": f"random ({dtype}, transformers init)",
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "load_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
                "transformers": transformers.__version__,
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "decode": {}, "prefill": {}})
    rec.point()
    window = int(config.max_position_embeddings)

    class StepClock(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token (after copying it to the host);
        synchronising there stamps the time each token was ready."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            if cuda:
                torch.cuda.synchronize(dev)
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(batch: int, n: int, new: int) -> tuple[float, list[float]]:
        """(seconds from the call to the first new token, times at which each new token was ready)."""
        ids = torch.tensor([prompt_ids(i, n, config.vocab_size) for i in range(batch)], device=dev)
        if cuda:
            torch.cuda.synchronize(dev)
        clock, t0 = StepClock(), time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, streamer=clock)
        tokens = clock.stamps[1:]  # stamps[0]: the prompt, before prefill
        if len(tokens) != new:
            raise RuntimeError(f"generate produced {len(tokens)} tokens, expected {new}")
        return tokens[0] - t0, tokens

    def peak_allocated() -> None:
        out["torch_max_memory_allocated_mib"] = (torch.cuda.max_memory_allocated(dev) >> 20) if cuda else None

    generate(1, 16, 4)  # warm-up
    for n_asked in grid.prefill:
        n = min(n_asked, window - 1)
        generate(1, n, 1)  # untimed: this prompt shape once
        med = sorted(generate(1, n, 1)[0] for _ in range(grid.prefill_reps))[grid.prefill_reps // 2]
        out["prefill"][str(n_asked)] = {"tok_s": n / med, "tokens": n, "seconds": med}
        peak_allocated()
        rec.point()
        log.info("transformers prefill %d: %.1f tok/s", n, n / med)
    for ctx in sorted(grid.contexts):
        plen = decode_prompt_len(min(ctx, window), grid)
        for b in grid.batches:
            _, stamps = generate(b, plen, 1 + grid.warmup + grid.steps)
            dt = stamps[-1] - stamps[grid.warmup]  # the last `steps` decode steps
            out["decode"][f"b{b}_ctx{ctx}"] = r = {"tok_s": b * grid.steps / dt, "prompt_len": plen,
                                                   "timed_tokens": b * grid.steps, "seconds": dt}
            peak_allocated()
            rec.point()
            log.info("transformers decode batch %d context %d: %.1f tok/s", b, ctx, r["tok_s"])
