"""The torch fp16 anchor of `bench e2e` is a real Llama decoder: its logits equal transformers' LlamaForCausalLM
holding the same weights, for a prompt and for the cached decode steps after it."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vptq_mlc.bench.e2e_torch import build_decoder, next_token

SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 101, "rms_norm_eps": 1e-5, "position_embedding_base": 5000.0}


def _reference(ours: torch.nn.Module) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, rms_norm_eps=1e-5, rope_theta=5000.0,
                      max_position_embeddings=64, tie_word_embeddings=False)
    ref = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    q, kv = 4 * 16, 2 * 16
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.qkv.weight.split([q, kv, kv])
        wg, wu = layer.gate_up.weight.chunk(2)
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.o.weight,
                   p + "mlp.gate_proj.weight": wg, p + "mlp.up_proj.weight": wu,
                   p + "mlp.down_proj.weight": layer.down.weight,
                   p + "input_layernorm.weight": layer.norm1.weight,
                   p + "post_attention_layernorm.weight": layer.norm2.weight})
    ref.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return ref


@torch.no_grad()
def test_anchor_logits_match_transformers() -> None:
    torch.manual_seed(0)
    ours = build_decoder(torch, SHAPE, batch_max=2, window=32, dev=torch.device("cpu"), dtype=torch.float32)
    for name, p in ours.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.1 * torch.randn_like(p)  # non-trivial norm weights
    ref = _reference(ours)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 0], [1, 2, 3, 4, 5, 6, 7]])
    want = ref(ids).logits[:, -1]
    got = ours(ids, torch.arange(7))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    seq = ids
    for step in range(3):  # cached decode steps, one token each
        tok = next_token(torch, got, 0.0, 1.0)
        assert torch.equal(tok, want.argmax(-1))
        seq = torch.cat([seq, tok[:, None]], dim=1)
        want = ref(seq).logits[:, -1]
        got = ours(tok[:, None], torch.tensor([7 + step]), kv_len=11)  # slots past the position are masked
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_anchor_sampling_respects_top_p() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(4000, 1)
    draws = next_token(torch, logits, 1.0, 0.7)  # p = .705, .259, ...: top-p 0.7 keeps token 0 alone
    assert set(draws.tolist()) == {0}
    draws = next_token(torch, logits, 1.0, 0.9)  # keeps tokens 0 and 1 (0.70 + 0.26 >= 0.9)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    probs = torch.softmax(logits[0, :2], -1)
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq[:2], probs, atol=0.03, rtol=0)
