"""DeepSeek-V3 / R1 (`deepseek_v3`) as a `tvm.relax.frontend.nn` module tree: MLA attention and a mixture of experts.

Attention: MLA's low-rank projections (q_a_proj -> q_a_layernorm -> q_b_proj, kv_a_proj_with_mqa -> kv_a_layernorm ->
kv_b_proj) run as ordinary (VPTQ or dense) linears; RoPE (with transformers' even/odd de-interleave when
`rope_interleave`) is applied here to the qk_rope dims, and the cache applies none. Two KV caches, picked at compile
time (`latent_kv_cache`):
- TVM's standard MHA paged cache (every target; the only one on llvm, where TVM 0.27 has no MLA kernels): the
  decompressed per-head K and V, `num_attention_heads` heads of width max(qk_nope + qk_rope, v_head_dim), the
  shorter of q/k and v zero-padded (a zero column changes neither q.k nor the output's first v_head_dim columns).
- TVM's latent cache (`attn_kind="mla"`, GPU targets, `compile --kv-cache mla`): one vector per token
  (normalised compressed KV and roped key part); the paged part of attention runs with kv_b_proj absorbed into the
  query and the output (W_UK, W_UV: dense per-head copies that convert writes, checkpoint/mla.py), a prefill adds
  the chunk's own tokens with decompressed K/V and merges the two (`_mla_merge`).

Mixture of experts: the router is transformers' DeepseekV3TopkRouter (sigmoid scores, `e_score_correction_bias` for the
choice only, groups ranked by their top-2 sum, top-k over the kept groups, optional normalisation, routed scaling),
computed as each token's top-k expert ids and weights. When the converter stacked the layer's routed experts
(artifact/expert_stack.py) only those experts run, gathered by one kernel launch per projection for every token
(tir_kernels/cuda_gather.py on GPUs, the generic TE kernel on CPU); a layer whose experts do not stack keeps the
dense form: every routed expert on every token, weighted by a [tokens, experts] matrix with zeros for unselected
experts (n_routed_experts / num_experts_per_tok times the expert work; docs/architectures.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from vptq_mlc.checkpoint.arch import DeepseekV3Config
from vptq_mlc.model.decoder import MLP, DecoderForCausalLM, DecoderLayer, DecoderModel, LinearFactory

# transformers' DeepseekV3RMSNorm default: the q_a / kv_a layernorms are built without config.rms_norm_eps
LORA_NORM_EPS = 1e-6


def _rope_source(j: Any, half: int, interleave: bool) -> Any:
    """The stored rope dim that lands at rotated position j (transformers' even/odd de-interleave when
    `rope_interleave`)."""
    return tirx.if_then_else(j < half, 2 * j, 2 * (j - half) + 1) if interleave else j


def _rotated(read: Any, pos: Any, j: Any, inv_freq: te.Tensor, rope: int, factor: float, interleave: bool) -> Any:
    """Rotated rope dim j as transformers computes it: x * cos + rotate_half(x) * sin in float32 (times the yarn
    attention factor); `read(d)` reads stored rope dim d."""
    half = rope // 2
    angle = pos.astype("float32") * inv_freq[tirx.floormod(j, half)]
    x = read(_rope_source(j, half, interleave)).astype("float32")
    partner = tirx.if_then_else(j < half, -read(_rope_source(j + half, half, interleave)),
                                read(_rope_source(j - half, half, interleave))).astype("float32")
    return x * tirx.cos(angle) * factor + partner * tirx.sin(angle) * factor


def _mla_qkv(q: te.Tensor, kv: te.Tensor, k_rope: te.Tensor, positions: te.Tensor, inv_freq: te.Tensor,
             nope: int, rope: int, v_dim: int, width: int, factor: float, interleave: bool) -> te.Tensor:
    """Fused [b, s, 3 * heads, width] for the MHA cache: q = (q_nope, rope(q_rope)), k = (k_nope, rope(k_rope) shared
    by the heads), v, each zero-padded to `width`."""
    b, s, heads, _ = q.shape

    def rotated(read: Any, pos: Any, j: Any) -> Any:
        return _rotated(read, pos, j, inv_freq, rope, factor, interleave)

    def compute(i: Any, t: Any, h: Any, d: Any) -> Any:
        pos = positions[i * s + t]
        zero = tirx.const(0, q.dtype)
        jr = tirx.max(tirx.min(d - nope, rope - 1), 0)  # clamped: if_then_else evaluates only the taken branch
        hq = tirx.min(h, heads - 1)
        hk = tirx.max(tirx.min(h - heads, heads - 1), 0)
        hv = tirx.max(tirx.min(h - 2 * heads, heads - 1), 0)
        dn = tirx.min(d, nope - 1)
        q_val = tirx.if_then_else(
            d < nope, q[i, t, hq, dn],
            tirx.if_then_else(d < nope + rope,
                              rotated(lambda j: q[i, t, hq, nope + j], pos, jr).astype(q.dtype), zero))
        k_val = tirx.if_then_else(
            d < nope, kv[i, t, hk, dn],
            tirx.if_then_else(d < nope + rope,
                              rotated(lambda j: k_rope[i, t, j], pos, jr).astype(q.dtype), zero))
        v_val = tirx.if_then_else(d < v_dim, kv[i, t, hv, nope + tirx.min(d, v_dim - 1)], zero)
        return tirx.if_then_else(h < heads, q_val, tirx.if_then_else(h < 2 * heads, k_val, v_val))

    return te.compute((b, s, 3 * heads, width), compute, name="mla_qkv")


def _mla_latent(q: te.Tensor, compressed: te.Tensor, k_rope: te.Tensor, positions: te.Tensor, inv_freq: te.Tensor,
                nope: int, rope: int, factor: float, interleave: bool) -> list[te.Tensor]:
    """For the latent cache: q [b, s, heads, nope + rope] with its rope dims rotated, and the token's latent
    [b, s, kv_lora + rope] = (normalised compressed KV, rotated k_rope), the vector the cache stores."""
    b, s, heads, _ = q.shape
    kv_lora = compressed.shape[2]

    def q_compute(i: Any, t: Any, h: Any, d: Any) -> Any:
        jr = tirx.max(tirx.min(d - nope, rope - 1), 0)
        turned = _rotated(lambda j: q[i, t, h, nope + j], positions[i * s + t], jr, inv_freq, rope, factor, interleave)
        return tirx.if_then_else(d < nope, q[i, t, h, tirx.min(d, nope - 1)], turned.astype(q.dtype))

    def latent_compute(i: Any, t: Any, d: Any) -> Any:
        jr = tirx.max(tirx.min(d - kv_lora, rope - 1), 0)
        turned = _rotated(lambda j: k_rope[i, t, j], positions[i * s + t], jr, inv_freq, rope, factor, interleave)
        return tirx.if_then_else(d < kv_lora, compressed[i, t, tirx.min(d, kv_lora - 1)], turned.astype(q.dtype))

    return [te.compute((b, s, heads, nope + rope), q_compute, name="mla_q_roped"),
            te.compute((b, s, kv_lora + rope), latent_compute, name="mla_latent")]


def _mla_self_kv(kv: te.Tensor, latent: te.Tensor, nope: int, v_dim: int, kv_lora: int) -> list[te.Tensor]:
    """The chunk's own decompressed keys [b, s, heads, nope + rope] (k_nope of kv_b_proj, then the roped k part of
    the latent, which every head shares) and values [b, s, heads, v_dim], for the ragged self-attention kernel."""
    b, s, heads, _ = kv.shape
    rope = latent.shape[2] - kv_lora

    def k_compute(i: Any, t: Any, h: Any, d: Any) -> Any:
        return tirx.if_then_else(d < nope, kv[i, t, h, tirx.min(d, nope - 1)],
                                 latent[i, t, kv_lora + tirx.max(d - nope, 0)])

    k = te.compute((b, s, heads, nope + rope), k_compute, name="mla_self_k")
    v = te.compute((b, s, heads, v_dim), lambda i, t, h, d: kv[i, t, h, nope + d], name="mla_self_v")
    return [k, v]


def _sequence_starts(positions: te.Tensor) -> te.Tensor:
    """[1]: how many rows of the batch sit at position 0 (each such row starts a sequence with nothing cached)."""
    r = te.reduce_axis((0, positions.shape[0]), name="r")
    return te.compute((1,), lambda _: te.sum(tirx.Select(positions[r] == 0, 1, 0), axis=r), name="mla_starts")


def _mla_merge(o_self: te.Tensor, lse_self: te.Tensor, o_cross: te.Tensor, lse_cross: te.Tensor,
               starts: te.Tensor, num_sequences: Any) -> te.Tensor:
    """A prefill's attention from its two parts: over the chunk's own tokens (`o_self`, causal) and over the cached
    pages (`o_cross`), each normalised with its log2-sum-exp (TVM's kernels keep lse in base 2), weighted as TVM's
    merge kernel does. Two batches need one part only, told apart by shapes and positions at run time:
    - every sequence appends one token (rows == sequences): TVM's cache then appends before attention
      (`append_before_attn_`), the pages already hold the chunk and the cross part alone is the answer;
    - no sequence has cached tokens (`starts`: each has one row at position 0): the cross kernel then runs on no
      page and leaves its outputs unwritten, so the self part alone is the answer."""
    b, s, heads, v_dim = o_self.shape
    rows = b * s
    f32 = "float32"

    def compute(i: Any, t: Any, h: Any, d: Any) -> Any:
        one_token_each = rows == num_sequences
        no_history = starts[0] == num_sequences
        ls, lc = lse_self[i, t, h], lse_cross[i, t, h]
        top = tirx.max(ls, lc)
        ws, wc = tirx.exp2(ls - top), tirx.exp2(lc - top)
        merged = (o_self[i, t, h, d].astype(f32) * ws + o_cross[i, t, h, d].astype(f32) * wc) / (ws + wc)
        return tirx.Select(one_token_each, o_cross[i, t, h, d].astype(f32),
                           tirx.Select(no_history, o_self[i, t, h, d].astype(f32), merged)).astype(o_self.dtype)

    return te.compute((b, s, heads, v_dim), compute, name="mla_merge")


@dataclasses.dataclass
class LatentStep:
    """What the exported function being traced is, for the latent-cache attention: `decode` (every sequence appends
    one token and TVM's cache appends it before attention: the cached pages are the whole context) or a prefill of
    `num_sequences` sequences (the chunk attends to itself and to the pages; see `_mla_merge`). Set by
    DeepseekV3ForCausalLM's functions before they trace the layers: `batch_prefill` counts its logit positions,
    so on this cache they must be one per sequence (MLC's contract, what the Engine passes; `eval ppl`, which asks
    for every position, refuses such a library)."""

    decode: bool = False
    num_sequences: Any = 1


class MLAttention(nn.Module):
    """transformers' DeepseekV3Attention, on the MHA paged KV cache (decompressed K/V per head) or, with `latent`
    (`step` given), on TVM's MLA cache: one latent vector per token, the absorbed W_UK / W_UV per head."""

    def __init__(self, cfg: DeepseekV3Config, prefix: str, make_linear: LinearFactory, dtype: str,
                 step: LatentStep | None = None):
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        self.cfg, self.heads, self.step = cfg, heads, step
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(f"{prefix}.q_proj", h, heads * cfg.qk_head_dim, False)
        else:
            self.q_a_proj = make_linear(f"{prefix}.q_a_proj", h, cfg.q_lora_rank, cfg.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, -1, LORA_NORM_EPS, bias=False, dtype=dtype)
            self.q_b_proj = make_linear(f"{prefix}.q_b_proj", cfg.q_lora_rank, heads * cfg.qk_head_dim, False)
        self.kv_a_proj_with_mqa = make_linear(f"{prefix}.kv_a_proj_with_mqa", h,
                                              cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank, -1, LORA_NORM_EPS, bias=False, dtype=dtype)
        self.kv_b_proj = make_linear(f"{prefix}.kv_b_proj", cfg.kv_lora_rank,
                                     heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), False)
        self.o_proj = make_linear(f"{prefix}.o_proj", heads * cfg.v_head_dim, h, cfg.attention_bias)
        if step is not None:  # names: checkpoint/mla.py (W_UK, W_UV), written by convert
            self.w_uk = nn.Parameter((heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank), dtype)
            self.w_uv = nn.Parameter((heads, cfg.kv_lora_rank, cfg.v_head_dim), dtype)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        c, heads = self.cfg, self.heads
        b, s, _ = x.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = op.reshape(q, (b, s, heads, c.qk_head_dim))
        compressed, k_rope = op.split(self.kv_a_proj_with_mqa(x), [c.kv_lora_rank], axis=-1)
        compressed = self.kv_a_layernorm(compressed)
        positions = kv.get_query_positions(b * s)
        inv_freq = Tensor.from_const(np.asarray(c.rope_inv_freq, dtype="float32"))
        if self.step is not None:
            out = self._latent_attention(q, compressed, k_rope, positions, inv_freq, kv, layer_id)
            return self.o_proj(op.reshape(out, (b, s, heads * c.v_head_dim)))
        kv_heads = op.reshape(self.kv_b_proj(compressed), (b, s, heads, c.qk_nope_head_dim + c.v_head_dim))
        qkv = op.tensor_expr_op(
            _mla_qkv, "mla_qkv",
            [q, kv_heads, k_rope, positions, inv_freq, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
             c.head_dim, float(c.rope_attention_factor), bool(c.rope_interleave)])
        out = kv.attention_with_fused_qkv(layer_id, qkv, heads, sm_scale=c.softmax_scale)
        if c.head_dim != c.v_head_dim:
            out = op.split(out, [c.v_head_dim], axis=-1)[0]
        return self.o_proj(op.reshape(out, (b, s, heads * c.v_head_dim)))

    def _latent_attention(self, q: Tensor, compressed: Tensor, k_rope: Tensor, positions: Tensor, inv_freq: Tensor,
                          kv: PagedKVCache, layer_id: int) -> Tensor:
        """[b, s, heads, v_head_dim] on the latent cache: append the tokens' latents, then attend over the cached
        pages with the absorbed query (q_nope @ W_UK, then the output @ W_UV) and, in a prefill, over the chunk's
        own tokens with decompressed K/V (kv_b_proj), merged by log-sum-exp (`_mla_merge`)."""
        c, heads, step = self.cfg, self.heads, self.step
        b, s, _, _ = q.shape
        nope, lora = c.qk_nope_head_dim, c.kv_lora_rank
        q_roped, latent = op.tensor_expr_op(
            _mla_latent, "mla_latent",
            [q, compressed, k_rope, positions, inv_freq, nope, c.qk_rope_head_dim, float(c.rope_attention_factor),
             bool(c.rope_interleave)])
        kv = kv.append_mla_kv(layer_id, op.reshape(latent, (b, s, 1, lora + c.qk_rope_head_dim)))
        q_nope, q_pe = op.split(q_roped, [nope], axis=-1)
        by_head = op.permute_dims(op.reshape(q_nope, (b * s, heads, nope)), [1, 0, 2])  # [heads, rows, nope]
        absorbed = op.astype(op.matmul(by_head, self.w_uk, out_dtype="float32"), q.dtype)  # [heads, rows, lora]
        q_latent = op.concat([op.reshape(op.permute_dims(absorbed, [1, 0, 2]), (b, s, heads, lora)), q_pe], dim=-1)
        o_latent, lse_cross = kv.cross_attention(layer_id, q_latent, lora, c.softmax_scale)
        o_heads = op.permute_dims(op.reshape(o_latent, (b * s, heads, lora)), [1, 0, 2])  # [heads, rows, lora]
        o_cross = op.astype(op.matmul(o_heads, self.w_uv, out_dtype="float32"), q.dtype)  # [heads, rows, v]
        o_cross = op.reshape(op.permute_dims(o_cross, [1, 0, 2]), (b, s, heads, c.v_head_dim))
        if step.decode:
            return o_cross
        kv_heads = op.reshape(self.kv_b_proj(compressed), (b, s, heads, nope + c.v_head_dim))
        k_self, v_self = op.tensor_expr_op(_mla_self_kv, "mla_self_kv", [kv_heads, latent, nope, c.v_head_dim, lora])
        o_self, lse_self = kv.self_attention(layer_id, q_roped, k_self, v_self, c.softmax_scale)
        starts = op.tensor_expr_op(_sequence_starts, "mla_sequence_starts", [positions])
        return op.tensor_expr_op(_mla_merge, "mla_merge",
                                 [o_self, lse_self, o_cross, lse_cross, starts, step.num_sequences])


def _route(logits: te.Tensor, bias: te.Tensor, n_group: int, topk_group: int, top_k: int, norm: bool,
           scale: float) -> te.Tensor:
    """[tokens, experts] routing weights of transformers' DeepseekV3TopkRouter (zeros for unselected experts)."""
    return _route_ranked(logits, bias, n_group, topk_group, top_k, norm, scale)[0]


def _route_topk(logits: te.Tensor, bias: te.Tensor, n_group: int, topk_group: int, top_k: int, norm: bool,
                scale: float) -> list[te.Tensor]:
    """The router's choice as slots: expert ids [tokens, top_k] int32 and their weights [tokens, top_k] float32
    (slot j holds the expert of rank j; ranks are distinct, so each slot has exactly one)."""
    weights, rank = _route_ranked(logits, bias, n_group, topk_group, top_k, norm, scale)
    t_n, e_n = logits.shape
    r_ids = te.reduce_axis((0, e_n), name="r_ids")
    ids = te.compute(
        (t_n, top_k), lambda t, j: te.sum(tirx.Select(rank[t, r_ids] == j, r_ids.var.astype("int32"), 0), axis=r_ids),
        name="router_ids")
    r_w = te.reduce_axis((0, e_n), name="r_w")
    w = te.compute((t_n, top_k), lambda t, j: te.sum(
        tirx.Select(rank[t, r_w] == j, weights[t, r_w], tirx.const(0, "float32")), axis=r_w), name="router_slot_w")
    return [ids, w]


def _route_ranked(logits: te.Tensor, bias: te.Tensor, n_group: int, topk_group: int, top_k: int, norm: bool,
                  scale: float) -> tuple[te.Tensor, te.Tensor]:
    """(weights [tokens, experts], rank [tokens, experts]): top-k sets are ranks, an entry is kept when fewer than
    k entries beat it, ties going to the lower index."""
    t_n, e_n = logits.shape
    size = e_n // n_group
    f32 = "float32"
    score = te.compute((t_n, e_n), lambda t, e: tirx.sigmoid(logits[t, e].astype(f32)), name="router_score")
    choice = te.compute((t_n, e_n), lambda t, e: score[t, e] + bias[e].astype(f32), name="router_choice")

    def beats(a: Any, ia: Any, b_: Any, ib: Any) -> Any:
        return tirx.any(a > b_, tirx.all(a == b_, ia < ib))

    r_in = te.reduce_axis((0, size), name="r_in")
    rank_in_group = te.compute(
        (t_n, e_n),
        lambda t, e: te.sum(tirx.Select(beats(choice[t, (e // size) * size + r_in], r_in, choice[t, e], e % size),
                                        1, 0), axis=r_in),
        name="router_rank_in_group")
    r_top = te.reduce_axis((0, size), name="r_top")
    group_score = te.compute(
        (t_n, n_group),
        lambda t, g: te.sum(tirx.Select(rank_in_group[t, g * size + r_top] < 2, choice[t, g * size + r_top],
                                        tirx.const(0, f32)), axis=r_top),
        name="router_group_score")
    r_g = te.reduce_axis((0, n_group), name="r_g")
    group_rank = te.compute(
        (t_n, n_group),
        lambda t, g: te.sum(tirx.Select(beats(group_score[t, r_g], r_g, group_score[t, g], g), 1, 0), axis=r_g),
        name="router_group_rank")
    masked = te.compute(  # transformers: masked_fill(~group_mask, 0.0)
        (t_n, e_n), lambda t, e: tirx.Select(group_rank[t, e // size] < topk_group, choice[t, e], tirx.const(0, f32)),
        name="router_masked")
    r_e = te.reduce_axis((0, e_n), name="r_e")
    rank = te.compute(
        (t_n, e_n), lambda t, e: te.sum(tirx.Select(beats(masked[t, r_e], r_e, masked[t, e], e), 1, 0), axis=r_e),
        name="router_rank")
    picked = te.compute((t_n, e_n), lambda t, e: tirx.Select(rank[t, e] < top_k, score[t, e], tirx.const(0, f32)),
                        name="router_picked")
    if not norm:
        return te.compute((t_n, e_n), lambda t, e: picked[t, e] * tirx.const(scale, f32), name="router_weights"), rank
    r_s = te.reduce_axis((0, e_n), name="r_s")
    total = te.compute((t_n,), lambda t: te.sum(picked[t, r_s], axis=r_s), name="router_total")
    return te.compute(
        (t_n, e_n), lambda t, e: picked[t, e] / (total[t] + tirx.const(1e-20, f32)) * tirx.const(scale, f32),
        name="router_weights"), rank


class Router(nn.Module):
    """`mlp.gate`: the router's weight [experts, hidden] and its score-correction bias [experts]."""

    def __init__(self, cfg: DeepseekV3Config, dtype: str):
        self.weight = nn.Parameter((cfg.n_routed_experts, cfg.hidden_size), dtype)
        # float32 in any model (registry: float32_dense): a rounded bias can flip which experts win
        self.e_score_correction_bias = nn.Parameter((cfg.n_routed_experts,), "float32")
        self.cfg = cfg

    def forward(self, x2: Tensor, slots: bool = False) -> Any:
        """Dense [tokens, experts] weights, or with `slots` the pair (expert ids, weights) [tokens, top_k]."""
        c = self.cfg
        logits = op.matmul(op.astype(x2, "float32"), op.permute_dims(op.astype(self.weight, "float32")))
        return op.tensor_expr_op(
            _route_topk if slots else _route, "moe_route_topk" if slots else "moe_route",
            [logits, self.e_score_correction_bias, c.n_group, c.topk_group, c.num_experts_per_tok,
             bool(c.norm_topk_prob), float(c.routed_scaling_factor)])


class MoE(nn.Module):
    """transformers' DeepseekV3MoE: routed experts weighted by the router (float32 sum) plus the shared experts.

    With stacked experts (`make_linear.gathered`, artifact/expert_stack.py) only each token's top-k experts run, in
    one kernel launch for gate and up (or two when their configs differ) and one for down, at every row count
    (decode and prefill alike); otherwise every expert runs on every token, weighted by its dense routing column."""

    def __init__(self, cfg: DeepseekV3Config, prefix: str, make_linear: LinearFactory, dtype: str):
        width = cfg.moe_intermediate_size
        gathered = getattr(make_linear, "gathered", None)
        stacks = gathered(f"{prefix}.experts") if gathered is not None else None
        if stacks is None:
            self.experts = nn.ModuleList([_mlp(cfg, f"{prefix}.experts.{e}", width, make_linear)
                                          for e in range(cfg.n_routed_experts)])
        else:
            self.experts = GatheredExperts(stacks)
        self.gate = Router(cfg, dtype)
        self.shared_experts = _mlp(cfg, f"{prefix}.shared_experts", width * cfg.n_shared_experts, make_linear)
        self.hidden, self.n_experts = cfg.hidden_size, cfg.n_routed_experts

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        x2 = op.reshape(x, (b * s, h))
        if isinstance(self.experts, GatheredExperts):
            ids, w = self.gate(x2, slots=True)
            routed = op.reshape(self.experts(x2, ids, w), (b, s, h))
            return routed + self.shared_experts(x)
        weights = op.split(self.gate(x2), self.n_experts, axis=1)
        acc = None
        for expert, w in zip(self.experts, weights):
            y = op.astype(expert(x2), "float32") * w
            acc = y if acc is None else acc + y
        routed = op.reshape(op.astype(acc, x.dtype), (b, s, h))
        return routed + self.shared_experts(x)


class GatheredExperts(nn.Module):
    """The routed experts as stacked VPTQ linears (module names `gate_up_proj` or `gate_proj` + `up_proj`, and
    `down_proj`, the tensor-cache names of artifact/expert_stack.py): per token its k experts' MLPs, summed with the
    router's weights in float32."""

    def __init__(self, stacks: dict[str, nn.Module]):
        for name, module in stacks.items():
            setattr(self, name, module)
        self.fused = "gate_up_proj" in stacks

    def forward(self, x2: Tensor, ids: Tensor, w: Tensor) -> Tensor:
        x3 = op.reshape(x2, (x2.shape[0], 1, x2.shape[1]))
        if self.fused:  # matrix 2e: expert e's gate, 2e + 1: its up
            mat = op.tensor_expr_op(
                lambda i: te.compute((i.shape[0], 2 * i.shape[1]),
                                     lambda t, j: i[t, j // 2] * 2 + (j % 2).astype("int32"), name="gate_up_ids"),
                "moe_gate_up_ids", [ids])
            gu = self.gate_up_proj(x3, mat)
            k = ids.shape[1]
            gate_up = op.reshape(gu, (gu.shape[0], k, 2, gu.shape[2]))
            gate, up = op.split(gate_up, 2, axis=2)
            h = op.silu(op.squeeze(gate, 2)) * op.squeeze(up, 2)
        else:
            h = op.silu(self.gate_proj(x3, ids)) * self.up_proj(x3, ids)
        y = op.astype(self.down_proj(h, ids), "float32")  # [tokens, k, hidden]
        routed = op.sum(y * op.reshape(w, (w.shape[0], w.shape[1], 1)), axis=1)
        return op.astype(routed, x2.dtype)


def _mlp(cfg: DeepseekV3Config, prefix: str, width: int, make_linear: LinearFactory) -> MLP:
    """The Llama MLP tree at another width (no biases in DeepSeek's MLPs)."""
    return MLP(dataclasses.replace(cfg, intermediate_size=width, mlp_bias=False), prefix, make_linear)


def _layer(cfg: DeepseekV3Config, index: int, make_linear: LinearFactory, dtype: str,
           step: LatentStep | None) -> DecoderLayer:
    """The Llama residual block around MLA and, past the first dense layers, the mixture of experts."""
    prefix = f"model.layers.{index}"
    mlp = (MoE(cfg, f"{prefix}.mlp", make_linear, dtype) if cfg.is_moe_layer(index)
           else _mlp(cfg, f"{prefix}.mlp", cfg.intermediate_size, make_linear))
    return DecoderLayer(cfg, index, make_linear, dtype,
                        attention=MLAttention(cfg, f"{prefix}.self_attn", make_linear, dtype, step), mlp=mlp)


class DeepseekV3ForCausalLM(DecoderForCausalLM):
    """The Llama family's exported functions and KV cache around the DeepSeek-V3 decoder stack. Default: the MHA
    cache (config: kv heads = heads, head_dim = the cache's padded width, RoPE in the model); `latent_kv_cache`:
    TVM's MLA cache (GPU targets only: TVM has no CPU kernels for it)."""

    def __init__(self, cfg: DeepseekV3Config, *args: Any, latent_kv_cache: bool = False, **kwargs: Any):
        self.step = LatentStep() if latent_kv_cache else None
        super().__init__(cfg, *args, **kwargs)

    def make_model(self, cfg: DeepseekV3Config, make_linear: LinearFactory, dtype: str) -> nn.Module:
        return DecoderModel(cfg, make_linear, dtype, lambda i: _layer(cfg, i, make_linear, dtype, self.step))

    def _traced(self, decode: bool, num_sequences: Any = 1) -> None:
        if self.step is not None:
            self.step.decode, self.step.num_sequences = decode, num_sequences

    def prefill(self, input_embed: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        self._traced(decode=False)
        return super().prefill(input_embed, kv)

    def decode(self, input_embed: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        self._traced(decode=True)
        return super().decode(input_embed, kv)

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor,
                      kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        self._traced(decode=False, num_sequences=logit_positions.shape[0])
        return super().batch_prefill(input_embeds, logit_positions, kv)

    def batch_decode(self, input_embeds: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        self._traced(decode=True)
        return super().batch_decode(input_embeds, kv)

    def create_tir_paged_kv_cache(
        self, max_batch_size: Any, max_total_seq_len: Any, prefill_chunk_size: Any, page_size: Any,
        support_sliding_window: Any, layer_begin: Any = None, layer_end: Any = None,
    ) -> PagedKVCache:
        """The MHA cache of the Llama family, or with `latent_kv_cache` TVM's MLA cache: one head of width
        kv_lora_rank + qk_rope_head_dim per token (RoPE applied by the model), the ragged self-attention at the
        decompressed widths (qk_nope + qk_rope, v_head_dim)."""
        if self.step is None:
            return super().create_tir_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size,
                                                     page_size, support_sliding_window, layer_begin, layer_end)
        c = self.cfg
        latent = c.kv_lora_rank + c.qk_rope_head_dim
        return TIRPagedKVCache(
            attn_kind="mla",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=1,
            qk_head_dim=latent,
            v_head_dim=c.kv_lora_rank,
            mla_original_qk_head_dim=c.qk_head_dim,
            mla_original_v_head_dim=c.v_head_dim,
            rope_mode=RopeMode.NONE,
            rope_scale=1,
            rope_theta=c.position_embedding_base,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=c.qk_rope_head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )
