"""The strong fp16 anchor of `vptq-mlc bench e2e`: a gpt-fast-style torch decoder of the same shape.

transformers' eager `generate` is host-bound (13-16 tok/s for a 7B model on an H100), so it says little about
what fp16 can do. This decoder is what a careful torch user writes: fp16 weights, one static KV cache
`[batch, kv_heads, window, head_dim]` per layer, `scaled_dot_product_attention`, and the whole decode step
(embedding, layers, lm_head, the next-token choice) captured once per batch size as a CUDA graph and replayed;
prefill is one eager forward over the prompt (cuBLAS GEMMs). Weights are random (the speed does not depend on
them). RoPE is the plain rotary embedding with the config's base: scaled variants change a few elementwise
constants, not the speed. The next token is the argmax (greedy) or a draw from the tempered, top-p-filtered
distribution, on the device and inside the graph, so the host never waits per step.

Also measures the device-to-device copy bandwidth in the same process: the memory roofline of a decode step is
weight bytes / that bandwidth.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vptq_mlc.bench.e2e_common import Grid, Recorder, decode_prompt_len, parse_sampling, prompt_ids

log = logging.getLogger(__name__)


def copy_bandwidth_gbs(torch: Any, dev: Any, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), median of `reps` copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[reps // 2] / 1e9


def build_decoder(torch: Any, shape: dict[str, Any], batch_max: int, window: int, dev: Any,
                  dtype: Any = None) -> Any:
    """The decoder module: random weights (fp16 unless `dtype`) of `shape` (mlc-chat-config model_config keys)."""
    nn, F = torch.nn, torch.nn.functional
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    n_heads = shape["num_attention_heads"]
    n_kv = shape.get("num_key_value_heads") or n_heads
    head_dim = shape.get("head_dim") or hidden // n_heads
    eps = shape.get("rms_norm_eps", 1e-6)
    base = shape.get("position_embedding_base", 10000.0)
    vocab = shape["vocab_size"]

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x: Any) -> Any:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * self.weight

    def rotate(x: Any, cos: Any, sin: Any) -> Any:
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = RMSNorm(), RMSNorm()
            self.qkv = nn.Linear(hidden, (n_heads + 2 * n_kv) * head_dim, bias=False)  # one GEMM, as gpt-fast
            self.o = nn.Linear(n_heads * head_dim, hidden, bias=False)
            self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
            self.down = nn.Linear(inter, hidden, bias=False)
            self.register_buffer("k_cache", torch.zeros(batch_max, n_kv, window, head_dim))
            self.register_buffer("v_cache", torch.zeros(batch_max, n_kv, window, head_dim))

        def forward(self, x: Any, pos: Any, cos: Any, sin: Any, mask: Any, kv_len: int) -> Any:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
            q = rotate(q.view(b, t, n_heads, head_dim).transpose(1, 2), cos, sin)
            k = rotate(k.view(b, t, n_kv, head_dim).transpose(1, 2), cos, sin)
            v = v.view(b, t, n_kv, head_dim).transpose(1, 2)
            self.k_cache[:b, :, pos] = k
            self.v_cache[:b, :, pos] = v
            att = F.scaled_dot_product_attention(q, self.k_cache[:b, :, :kv_len], self.v_cache[:b, :, :kv_len],
                                                 attn_mask=mask, enable_gqa=n_kv != n_heads)
            x = x + self.o(att.transpose(1, 2).reshape(b, t, n_heads * head_dim))
            g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(g) * u)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(shape["num_hidden_layers"]))
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            ang = torch.outer(torch.arange(window, dtype=torch.float32), inv)
            self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1))
            self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1))
            self.register_buffer("causal", torch.tril(torch.ones(window, window, dtype=torch.bool)))

        def forward(self, ids: Any, pos: Any, kv_len: int | None = None) -> Any:
            """Logits of the last position; `pos` [t] int64 are the positions of `ids` [b, t]; attention reads the
            first `kv_len` cache slots (default: up to the last position, which needs `pos` on the host)."""
            kv_len = int(pos[-1]) + 1 if kv_len is None else kv_len
            x = self.embed(ids)
            cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
            mask = self.causal[pos][None, None, :, :kv_len]  # a query sees the cache slots <= its position
            for layer in self.layers:
                x = layer(x, pos, cos, sin, mask, kv_len)
            return self.lm_head(self.norm(x[:, -1])).float()

    with dev:
        model = Decoder().to(dtype or torch.float16).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    return model


def next_token(torch: Any, logits: Any, temperature: float, top_p: float) -> Any:
    """Greedy (temperature 0) or a draw after temperature and top-p, all on the device (graph-capturable)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    # exponential race == multinomial draw; torch.rand is replayable inside a CUDA graph
    choice = (sorted_p / -torch.log(torch.rand_like(sorted_p).clamp_min(1e-20))).argmax(-1)
    return order.gather(-1, choice[:, None])[:, 0]


def run_torch_system(model_dir: str, device: str, grid: Grid, rec: Recorder) -> None:
    """The grid for the torch fp16 CUDA-graph decoder of `model_dir`'s shape, into `rec.out` (same keys as the
    other systems), plus the copy bandwidth of this GPU. Decode samples as `grid.sampling` asks (temperature and
    top_p; the model's defaults from mlc-chat-config.json for "model"), like our systems."""
    import torch

    from vptq_mlc.artifact.chat_config import ChatConfig

    chat = ChatConfig.load(model_dir)
    mode = parse_sampling(grid.sampling)
    temperature, top_p = {"greedy": (0.0, 1.0), "model": (chat.temperature, chat.top_p)}.get(mode, mode)
    shape = chat.model_config
    window = int(chat.context_window_size or shape["context_window_size"])
    cache_len = min(window, max(*grid.contexts, *grid.prefill) + 1)  # the cache need not span a 128K window
    dev = torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError("the torch CUDA-graph anchor needs a CUDA device")
    out = rec.out
    out.update({"copy_bandwidth_gbs": copy_bandwidth_gbs(torch, dev), "torch": torch.__version__,
                "sampling": {"temperature": temperature, "top_p": top_p}, "decode": {}, "prefill": {}})
    t0 = time.perf_counter()
    batch_max = max(grid.batches)
    model = build_decoder(torch, shape, batch_max, cache_len, dev)
    out["weights"] = "random (float16)"
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["kv_cache_bytes"] = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "cache" in n)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    rec.point()

    def sync() -> None:
        torch.cuda.synchronize(dev)

    @torch.no_grad()
    def prefill(batch: int, n: int) -> Any:
        ids = torch.tensor([prompt_ids(i, n, shape["vocab_size"]) for i in range(batch)], device=dev)
        return next_token(torch, model(ids, torch.arange(n, device=dev)), temperature, top_p)

    graphs: dict[tuple[int, int], tuple[Any, Any, Any, Any]] = {}

    @torch.no_grad()
    def decode_graph(batch: int, kv_len: int) -> tuple[Any, Any, Any, Any]:
        """(graph, static ids [b, 1], static pos [1], static next tokens [b]) for `batch` rows attending over
        `kv_len` cache slots (as gpt-fast, one graph per shape; the mask hides the slots past the position)."""
        if (batch, kv_len) not in graphs:
            ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
            pos = torch.zeros(1, dtype=torch.long, device=dev)
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up outside the graph (cuBLAS workspaces, autotuning)
                    next_token(torch, model(ids, pos, kv_len), temperature, top_p)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                tok = next_token(torch, model(ids, pos, kv_len), temperature, top_p)
            graphs[batch, kv_len] = (graph, ids, pos, tok)
        return graphs[batch, kv_len]

    for n_asked in grid.prefill:
        n = min(n_asked, window - 1)
        prefill(1, n)
        sync()
        times = []
        for _ in range(grid.prefill_reps):
            start = time.perf_counter()
            prefill(1, n)
            sync()
            times.append(time.perf_counter() - start)
        med = sorted(times)[grid.prefill_reps // 2]
        out["prefill"][str(n_asked)] = {"tok_s": n / med, "tokens": n, "seconds": med}
        rec.point()
        log.info("torch-fp16 prefill %d: %.1f tok/s", n, n / med)
    for ctx in sorted(grid.contexts):
        plen = decode_prompt_len(min(ctx, window), grid)
        for b in grid.batches:
            graph, ids, pos, tok = decode_graph(b, min(ctx, window))
            ids[:, 0] = prefill(b, plen)
            for step in range(grid.warmup):
                pos.fill_(plen + step)
                graph.replay()
                ids[:, 0] = tok
            sync()
            start = time.perf_counter()
            for step in range(grid.warmup, grid.warmup + grid.steps):
                pos.fill_(plen + step)
                graph.replay()
                ids[:, 0] = tok
            sync()
            dt = time.perf_counter() - start
            out["decode"][f"b{b}_ctx{ctx}"] = r = {"tok_s": b * grid.steps / dt, "prompt_len": plen,
                                                   "timed_tokens": b * grid.steps, "seconds": dt}
            out["torch_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(dev) >> 20
            rec.point()
            log.info("torch-fp16 decode batch %d context %d: %.1f tok/s", b, ctx, r["tok_s"])
