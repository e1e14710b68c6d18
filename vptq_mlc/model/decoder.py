"""The Llama-family decoder as a `tvm.relax.frontend.nn` module tree, exported with MLC-LLM's function names.

Llama, Mistral and Qwen2 share this tree; their registry entries (checkpoint/arch.py) map each HF config onto
`DecoderConfig` (biases, head_dim, RoPE). Which linears are VPTQ-quantized is decided by `make_linear`, so this file
never mentions codebooks. Attention runs inside TVM's paged KV cache (`TIRPagedKVCache`), and so does RoPE whose
frequencies TVM computes as transformers does (plain, llama3); other scalings (linear, yarn, longrope) rotate q and k
here from transformers' inverse frequencies stored in the config, and the cache then applies none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from vptq_mlc.model.config import DecoderConfig
from vptq_mlc.model.vptq_linear import (
    linear_residual,
    project_concat,
    project_shared_input,
    shares_launches,
    swiglu_residual,
)

# (module path, in_features, out_features, has_bias) -> module computing x @ W.T (+ b)
LinearFactory = Callable[[str, int, int, bool], nn.Module]


def _gather_rows(table: te.Tensor, ids: te.Tensor, dtype: str) -> te.Tensor:
    """table[ids] in `dtype` (TE: relax's take warns about unchecked indices; the engine checks ids against the
    vocab). The cast lets a table stored narrower than the model (`embedding_dtype`) feed it rows directly."""
    return te.compute((ids.shape[0], table.shape[1]), lambda i, j: table[ids[i], j].astype(dtype),
                      name="gather_rows")


def _tied_head(hidden: te.Tensor, table: te.Tensor, out_dtype: str) -> te.Tensor:
    """hidden @ table.T with each table entry cast to `out_dtype` inside the dot product, so a head stored in
    fp16 streams half the bytes without a widened copy of the table (the CPU schedule, compile/cpu.py, keeps this
    one block vectorized)."""
    b, s, h = hidden.shape
    k = te.reduce_axis((0, h), name="k")
    return te.compute((b, s, table.shape[0]), lambda i, j, r: te.sum(
        hidden[i, j, k].astype(out_dtype) * table[r, k].astype(out_dtype), axis=k), name="tied_head")


def _gather_positions(x: te.Tensor, pos: te.Tensor) -> te.Tensor:
    """x[:, pos, :] for the last token of each packed sequence."""
    return te.compute((x.shape[0], pos.shape[0], x.shape[2]), lambda b, i, k: x[b, pos[i], k], name="gather_pos")


def _rotate_qk(qkv: te.Tensor, positions: te.Tensor, inv_freq: te.Tensor, rotated_heads: int,
               factor: float) -> te.Tensor:
    """transformers' apply_rotary_pos_emb on the q and k heads of fused qkv [b, s, heads, d] (v passes through):
    x * cos + rotate_half(x) * sin with cos/sin = cos/sin(position * inv_freq) * attention factor, in float32."""
    b, s, heads, d = qkv.shape
    half = d // 2

    def compute(i: Any, j: Any, h: Any, k: Any) -> Any:
        angle = positions[i * s + j].astype("float32") * inv_freq[tirx.floormod(k, half)]
        x = qkv[i, j, h, k].astype("float32")
        partner = tirx.if_then_else(k < half, -qkv[i, j, h, k + half], qkv[i, j, h, k - half]).astype("float32")
        rotated = x * tirx.cos(angle) * factor + partner * tirx.sin(angle) * factor
        return tirx.if_then_else(h < rotated_heads, rotated, x).astype(qkv.dtype)

    return te.compute((b, s, heads, d), compute, name="rotary")


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, prefix: str, make_linear: LinearFactory):
        d, hq, hkv, h = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
        self.head_dim, self.num_q_heads, self.num_kv_heads = d, hq, hkv
        self.q_proj = make_linear(f"{prefix}.q_proj", h, hq * d, cfg.attention_bias)
        self.k_proj = make_linear(f"{prefix}.k_proj", h, hkv * d, cfg.attention_bias)
        self.v_proj = make_linear(f"{prefix}.v_proj", h, hkv * d, cfg.attention_bias)
        self.o_proj = make_linear(f"{prefix}.o_proj", hq * d, h, cfg.attention_out_bias)
        self.inv_freq = cfg.rope_inv_freq
        self.rope_factor = float(cfg.rope_attention_factor)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, norm: nn.Module | None = None,
                residual: Tensor | None = None) -> Tensor:
        """o_proj(attention(q/k/v of norm(x))) (+ residual): `norm` and `residual` let the target fold the layer's
        pre-norm into the q/k/v kernels and the residual add into o_proj's (nothing folded: the same graph)."""
        b, s, _ = x.shape
        qkv = project_concat([self.q_proj, self.k_proj, self.v_proj], x, norm)
        qkv = op.reshape(qkv, (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        if self.inv_freq is not None:
            positions = kv.get_query_positions(b * s)
            inv_freq = Tensor.from_const(np.asarray(self.inv_freq, dtype="float32"))
            qkv = op.tensor_expr_op(
                _rotate_qk, "rotary", [qkv, positions, inv_freq, self.num_q_heads + self.num_kv_heads,
                                       self.rope_factor])
        out = op.reshape(kv.attention_with_fused_qkv(layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim**-0.5),
                         (b, s, self.num_q_heads * self.head_dim))
        return self.o_proj(out) if residual is None else linear_residual(self.o_proj, out, residual)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, prefix: str, make_linear: LinearFactory):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_linear(f"{prefix}.gate_proj", h, i, cfg.mlp_bias)
        self.up_proj = make_linear(f"{prefix}.up_proj", h, i, cfg.mlp_bias)
        self.down_proj = make_linear(f"{prefix}.down_proj", i, h, cfg.mlp_bias)

    def forward(self, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None) -> Tensor:
        """down(silu(gate(norm(x))) * up(norm(x))) (+ residual), folded into fewer launches where the target can."""
        if norm is not None or residual is not None or shares_launches([self.gate_proj, self.up_proj], x):
            gate, up = project_shared_input([self.gate_proj, self.up_proj], x, norm)
            return swiglu_residual(self.down_proj, gate, up, residual)
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: `attention` and `mlp` are the family's blocks (Llama's when not given)."""

    def __init__(self, cfg: DecoderConfig, index: int, make_linear: LinearFactory, dtype: str,
                 attention: nn.Module | None = None, mlp: nn.Module | None = None):
        prefix = f"model.layers.{index}"
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", make_linear) if attention is None else attention
        self.mlp = MLP(cfg, f"{prefix}.mlp", make_linear) if mlp is None else mlp
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)
        self.layer_id = index

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: Any = None) -> Tensor:
        """`layer_id` overrides the layer's own index (the split functions pass it as a runtime argument)."""
        layer_id = self.layer_id if layer_id is None else layer_id
        # Llama's blocks take the norm and the residual, so a target can fold them into their kernels
        if isinstance(self.self_attn, Attention):
            x = self.self_attn(x, kv, layer_id, norm=self.input_layernorm, residual=x)
        else:
            x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
        if isinstance(self.mlp, MLP):
            return self.mlp(x, norm=self.post_attention_layernorm, residual=x)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """embed_tokens, the layers, the final norm; `make_layer(index)` builds layer `index` (Llama's by default)."""

    def __init__(self, cfg: DecoderConfig, make_linear: LinearFactory, dtype: str,
                 make_layer: Callable[[int], nn.Module] | None = None):
        make_layer = make_layer or (lambda i: DecoderLayer(cfg, i, make_linear, dtype))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList([make_layer(i) for i in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=dtype)

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        for layer in self.layers:
            x = layer(x, kv)
        return self.norm(x)


class DecoderForCausalLM(nn.Module):
    """Top-level module; its methods are the library's exported functions (docs/ARCHITECTURE.md)."""

    def __init__(self, cfg: DecoderConfig, make_linear: LinearFactory, dtype: str, target: Target,
                 static_decode_batches: tuple[int, ...] = (), logits_dtype: str | None = None,
                 embedding_dtype: str | None = None):
        """`embedding_dtype`: the stored dtype of the embedding table (and so of a tied head) when the model dir
        keeps it narrower than `dtype` (ChatConfig.embedding_dtype); rows and head products are computed in `dtype`
        / the logits dtype."""
        self.model = self.make_model(cfg, make_linear, dtype)
        if embedding_dtype and embedding_dtype != dtype:
            self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=embedding_dtype)
        # the logits matmul's sum dtype: the target's choice (CPUs: fp32, an fp16 running sum is converted at every
        # step there; None: the model's dtype)
        self.logits_dtype = logits_dtype
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, out_dtype=self.logits_dtype)
        self.cfg, self.dtype, self.target = cfg, dtype, target
        self.static_decode_batches = tuple(n for n in static_decode_batches if 1 < n <= cfg.max_batch_size)

    def make_model(self, cfg: DecoderConfig, make_linear: LinearFactory, dtype: str) -> nn.Module:
        """The decoder stack (embed_tokens, layers, norm); a family with other layers overrides this only."""
        return DecoderModel(cfg, make_linear, dtype)

    def _logits(self, hidden: Tensor) -> Tensor:
        table = self.model.embed_tokens.weight
        if self.lm_head is None and table.dtype != hidden.dtype:  # a narrower stored table: cast inside the product
            logits = op.tensor_expr_op(_tied_head, "tied_head", [hidden, table, self.logits_dtype or hidden.dtype])
        elif self.lm_head is None:
            logits = op.matmul(hidden, op.permute_dims(table), out_dtype=self.logits_dtype)
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def embed(self, input_ids: Tensor) -> Tensor:
        return op.tensor_expr_op(_gather_rows, "embed_gather", [self.model.embed_tokens.weight, input_ids, self.dtype])

    def prefill(self, input_embed: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        hidden = self.model(input_embed, kv)

        def last_token(x: Any) -> Any:
            b, s, h = x.shape
            return te.compute((b, 1, h), lambda i, _, k: x[i, s - 1, k], name="last_token")

        hidden = op.tensor_expr_op(last_token, "last_token", [hidden])
        return self._logits(hidden), kv

    def decode(self, input_embed: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self._logits(self.model(input_embed, kv)), kv

    def batch_prefill(
        self, input_embeds: Tensor, logit_positions: Tensor, kv: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache]:
        hidden = self.model(input_embeds, kv)
        hidden = op.tensor_expr_op(_gather_positions, "gather_positions", [hidden, logit_positions])
        return self._logits(hidden), kv

    def batch_decode(self, input_embeds: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self._logits(self.model(input_embeds, kv)), kv

    def __getattr__(self, name: str) -> Any:
        # `batch_decode_b<n>`: batch_decode exported again with a static batch of n (see get_default_spec)
        if name.startswith("batch_decode_b") and name[14:].isdigit():
            return self.batch_decode
        return super().__getattr__(name)

    def create_tir_paged_kv_cache(
        self, max_batch_size: Any, max_total_seq_len: Any, prefill_chunk_size: Any, page_size: Any,
        support_sliding_window: Any, layer_begin: Any = None, layer_end: Any = None,
    ) -> PagedKVCache:
        """The paged KV cache; with `layer_begin`/`layer_end` (the split's per-stage cache) it holds only those
        layers and takes their global ids (TVM's cache subtracts `layer_partition[0]` outside disco)."""
        c = self.cfg
        partition = [0, c.num_hidden_layers] if layer_begin is None else [layer_begin, layer_end]
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr(partition),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE if c.rope_inv_freq is not None else RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.position_embedding_base,
            rope_scaling=c.rope_scaling or {},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        h, packed = self.cfg.hidden_size, {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], self.dtype), "kv": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, h], self.dtype), "kv": kv, "$": packed},
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", h], self.dtype),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "kv": kv,
                "$": packed,
            },
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, h], self.dtype), "kv": kv, "$": packed},
            # static batch sizes get the targets' decode GEMV kernels (a symbolic batch gets the general matmul);
            # the engine splits a decode batch into such pieces
            **{
                f"batch_decode_b{n}": {"input_embeds": nn.spec.Tensor([n, 1, h], self.dtype), "kv": kv, "$": packed}
                for n in self.static_decode_batches
            },
            "create_tir_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)
