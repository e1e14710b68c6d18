"""A tiny Llama exported with the MLC library interface (docs/ARCHITECTURE.md), for runtime tests.

Why it exists: the runtime must be testable without the real model/ + compile/ stages. The weights come
from a random-init `transformers.LlamaForCausalLM`, so that model is the independent reference for the
engine's greedy tokens. Build side only (tvm.relax, torch); the runtime under test never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world! héllo wörld, 你好世界, emoji 🙂🚀. "
    "Numbers 0123456789 and punctuation: ;:'\"()[]{}<>?/\\|-_=+*&^%$#@!~`. "
) * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_byte_level_tokenizer(out: Path, vocab_size: int = 320) -> int:
    """Train a small byte-level BPE (GPT-2 style) and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([VOCAB_TEXT], trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 1024,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tok.get_vocab_size()


def hf_tiny_llama(vocab_size: int, seed: int = 0, num_layers: int = 2) -> Any:
    """Random-init tiny LlamaForCausalLM (float32): the reference model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init so greedy tokens vary with context
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    return model


def _build_module(cfg: Any, context_window: int, prefill_chunk: int, max_batch: int):  # noqa: ANN202
    import tvm
    from tvm import relax as rx
    from tvm import te
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
    from tvm.target import Target

    h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L, V, eps = cfg.num_hidden_layers, cfg.vocab_size, cfg.rms_norm_eps

    class Attn(nn.Module):
        def __init__(self) -> None:
            self.qkv_proj = nn.Linear(h, (nq + 2 * nkv) * d, bias=False)
            self.o_proj = nn.Linear(nq * d, h, bias=False)

        def forward(self, x: nn.Tensor, kv: PagedKVCache, layer_id: int) -> nn.Tensor:
            b, s, _ = x.shape
            qkv = op.reshape(self.qkv_proj(x), (b, s, nq + 2 * nkv, d))
            out = kv.attention_with_fused_qkv(layer_id, qkv, nq, sm_scale=d**-0.5)
            return self.o_proj(op.reshape(out, (b, s, nq * d)))

    class MLP(nn.Module):
        def __init__(self) -> None:
            self.gate_up_proj = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
            self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(op.silu(gate) * up)

    class Layer(nn.Module):
        def __init__(self) -> None:
            self.input_layernorm = nn.RMSNorm(h, -1, eps, bias=False)
            self.self_attn = Attn()
            self.post_attention_layernorm = nn.RMSNorm(h, -1, eps, bias=False)
            self.mlp = MLP()

        def forward(self, x: nn.Tensor, kv: PagedKVCache, layer_id: int) -> nn.Tensor:
            x = x + self.self_attn(self.input_layernorm(x), kv, layer_id)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Inner(nn.Module):
        def __init__(self) -> None:
            self.embed_tokens = nn.Embedding(V, h)
            self.layers = nn.ModuleList([Layer() for _ in range(L)])
            self.norm = nn.RMSNorm(h, -1, eps, bias=False)

    def last_token(x: nn.Tensor) -> nn.Tensor:
        def compute(t: te.Tensor) -> te.Tensor:
            b, s, k = t.shape
            return te.compute((b, 1, k), lambda i, _, j: t[i, s - 1, j], name="last")

        return op.tensor_expr_op(compute, "last_token", [x])

    class TinyLlama(nn.Module):
        def __init__(self) -> None:
            self.model = Inner()
            self.lm_head = nn.Linear(h, V, bias=False)

        def _body(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, kv, i)
            return self.model.norm(x)

        def _logits(self, x: nn.Tensor) -> nn.Tensor:
            return op.astype(self.lm_head(x), "float32")

        def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
            return self.model.embed_tokens(input_ids)

        def prefill(self, input_embed: nn.Tensor, kv: PagedKVCache):  # noqa: ANN201
            return self._logits(last_token(self._body(input_embed, kv))), kv

        def decode(self, input_embed: nn.Tensor, kv: PagedKVCache):  # noqa: ANN201
            return self._logits(self._body(input_embed, kv)), kv

        def batch_prefill(self, input_embeds: nn.Tensor, logit_positions: nn.Tensor, kv: PagedKVCache):  # noqa: ANN201
            hidden = op.take(self._body(input_embeds, kv), logit_positions, axis=1)
            return self._logits(hidden), kv

        def batch_decode(self, input_embeds: nn.Tensor, kv: PagedKVCache):  # noqa: ANN201
            return self._logits(self._body(input_embeds, kv)), kv

        def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,  # noqa: ANN001, ANN201
                                      support_sliding_window):
            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window, layer_partition=rx.ShapeExpr([0, L]),
                num_hidden_layers=L, num_attention_heads=nq, num_key_value_heads=nkv, qk_head_dim=d,
                v_head_dim=d, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=cfg.rope_theta, rope_scaling={},
                rope_ext_factors=rx.prim_value(0), rotary_dim=d, enable_disaggregation=False,
                dtype="float32", target=Target("llvm"),
            )

    packed = {"param_mode": "packed", "effect_mode": "none"}
    kv_obj = nn.spec.Object(object_type=PagedKVCache)
    spec = {
        "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
        "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", h], "float32"), "kv": kv_obj, "$": packed},
        "decode": {"input_embed": nn.spec.Tensor([1, 1, h], "float32"), "kv": kv_obj, "$": packed},
        "batch_prefill": {
            "input_embeds": nn.spec.Tensor([1, "seq_len", h], "float32"),
            "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
            "kv": kv_obj,
            "$": packed,
        },
        "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, h], "float32"), "kv": kv_obj, "$": packed},
        "create_tir_paged_kv_cache": {
            "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
            "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
        },
    }
    model = TinyLlama()
    mod, named_params = model.export_tvm(spec=nn.spec.ModuleSpec.from_raw(spec, model))
    metadata = {
        "model_type": "llama", "quantization": "q0f32", "context_window_size": context_window,
        "prefill_chunk_size": prefill_chunk, "max_batch_size": max_batch, "tensor_parallel_shards": 1,
        "sliding_window_size": -1, "attention_sink_size": -1, "pipeline_parallel_stages": 1,
        "kv_state_kind": "kv_cache", "model_task": "chat",
        "params": [{"name": n, "shape": list(p.shape), "dtype": p.dtype, "preprocs": []} for n, p in named_params],
        "kv_cache": {"num_hidden_layers": L, "num_attention_heads": nq, "num_key_value_heads": nkv, "head_dim": d},
        "memory_usage": {},
    }
    bb = rx.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata)))
    return bb.get(), [n for n, _ in named_params], metadata


def hf_to_mlc_params(hf_model: Any) -> dict[str, np.ndarray]:
    """HF Llama state dict -> the fused names/layouts of the tiny library (q|k|v and gate|up concatenated)."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"]}
    for i in range(hf_model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], axis=0)
        out[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], axis=0)
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out["model.norm.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def build_tiny_model_dir(out: Path, context_window: int = 128, prefill_chunk: int = 32, max_batch: int = 4,
                         seed: int = 0) -> tuple[Path, Path, Any]:
    """Write tokenizer + mlc-chat-config.json + tensor cache + `tiny_cpu.so` into `out`.

    Returns (model_dir, lib_path, hf_reference_model).
    """
    import tvm
    from tvm.contrib import tvmjs

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_level_tokenizer(out)
    hf = hf_tiny_llama(vocab, seed)
    mod, names, _ = _build_module(hf.config, context_window, prefill_chunk, max_batch)
    params = hf_to_mlc_params(hf)
    assert sorted(params) == sorted(names), (sorted(params), sorted(names))
    tvmjs.dump_tensor_cache({n: params[n] for n in names}, str(out), encode_format="raw", show_progress=False)
    lib = out / "tiny_cpu.so"
    tvm.compile(mod, target="llvm").export_library(str(lib))
    chat_cfg = {
        "version": "0.1.0", "model_type": "llama", "quantization": "q0f32",
        "model_config": {"hidden_size": 32, "vocab_size": vocab, "num_hidden_layers": hf.config.num_hidden_layers},
        "vocab_size": vocab, "context_window_size": context_window, "sliding_window_size": -1,
        "prefill_chunk_size": prefill_chunk, "attention_sink_size": -1, "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1, "active_vocab_size": vocab, "temperature": 0.7, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "repetition_penalty": 1.0, "top_p": 0.95,
        "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"],
        "tokenizer_info": {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                           "strip_space_in_decode": False},
        "conv_template": "chatml", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "model_task": "chat",
    }
    (out / "mlc-chat-config.json").write_text(json.dumps(chat_cfg, indent=2))
    return out, lib, hf
