"""Random VPTQ layers and complete tiny VPTQ checkpoints (tests, benchmarks, the README demo before `quantize`).

A synthetic checkpoint is a real one in every respect a reader can check: config.json with the architecture's HF
keys, community-layout safetensors, a trained byte-level BPE `tokenizer.json` and a ChatML chat template. The
weights are random but scaled so that a couple of layers give finite, non-degenerate logits.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vptq_mlc.checkpoint.arch import ARCHITECTURES, SUPPORTED_ARCHS, decoder_config_from_hf, decoder_linears
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.packing import pack_indices
from vptq_mlc.checkpoint.writer import write_checkpoint
from vptq_mlc.errors import CheckpointError

BOS, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = (BOS, IM_START, EOS)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def random_layer(
    cfg: VPTQLayerConfig, rng: np.random.Generator, dtype: str | np.dtype = "float32", *, scale: float = 0.05
) -> dict[str, np.ndarray]:
    """Tensors (short names) of a random layer: codes over the full code range, N(0, scale) codebooks,
    a random perm, norm scale near 1, small norm and linear biases; packed or unpacked per `cfg`."""
    dt = np.dtype(dtype)
    G, N, S, v = cfg.group_num, cfg.num_vectors, cfg.group_size, cfg.vector_len

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dt)

    t: dict[str, np.ndarray] = {"centroids.weight": normal((G, cfg.num_centroids * v), scale)}
    idx = rng.integers(0, cfg.num_centroids, (G, N, S), dtype=np.int64)
    res = None
    if cfg.has_residual:
        t["res_centroids.weight"] = normal((G, cfg.num_res_centroids * v), scale / 4)
        res = rng.integers(0, cfg.num_res_centroids, (G, N, S), dtype=np.int64)
    if cfg.is_indice_packed:
        t["indices"] = pack_indices(idx, res, cfg)
    else:
        t["indices"] = idx.astype(np.uint16).view(np.int16)
        if res is not None:
            t["res_indices"] = res.astype(np.uint16).view(np.int16)
    if cfg.has_outliers:
        ko, vo = cfg.num_outlier_centroids, cfg.outlier_vector_len
        t["outlier_centroids.weight"] = normal((1, ko * vo), scale)
        oidx = rng.integers(0, ko, (1, cfg.num_outlier_vectors, cfg.outlier_size), dtype=np.int64)
        t["outlier_indices"] = oidx.astype(np.uint16).view(np.int16)
    if cfg.enable_perm:
        perm = rng.permutation(cfg.in_features)
        t["perm"] = perm.astype(np.uint16).view(np.int16) if cfg.is_indice_packed else perm.astype(np.int64)
    if cfg.enable_norm:
        t["weight_scale"] = (1.0 + rng.uniform(-0.2, 0.2, cfg.in_features)).astype(dt)
        t["weight_bias"] = normal((cfg.in_features,), scale / 10)
    if cfg.bias:
        t["bias"] = normal((cfg.out_features,), 0.02)
    return t


# ---- tokenizer ----

_WORDS = (
    "the of and to in is was for on that with as by it at from his her an are were which be this has had not "
    "but its they their one two three first new year time people city world water light house music river "
    "school small large early later model language number system history north south east west story state "
    "during after before under between through against while where when there would could other about many"
).split()


def _corpus(n_sentences: int = 3000) -> list[str]:
    """Deterministic English-like text (a fixed LCG over a word list): the same bytes on every machine."""
    out, x = [], 12345
    for _ in range(n_sentences):
        words = []
        for _ in range(6 + x % 9):
            x = (x * 1103515245 + 12345) % (1 << 31)
            words.append(_WORDS[(x >> 8) % len(_WORDS)])
        s = " ".join(words).capitalize() + (". " if x % 3 else "? ") + str(x % 1000)
        out.append(s)
    return out


@functools.lru_cache(maxsize=8)
def synthetic_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE trained on `_corpus()` with at most `vocab_size` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise CheckpointError(f"vocab_size={vocab_size} too small for a byte-level tokenizer; use >= 259")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # the corpus supports ~1500 entries; fill larger vocabularies with reserved special tokens (as Llama 3 does)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(missing)])
    return tok.to_str()


def _write_tokenizer(d: Path, vocab_size: int, max_len: int) -> dict[str, int]:
    from tokenizers import Tokenizer

    js = synthetic_tokenizer_json(vocab_size)
    tok = Tokenizer.from_str(js)
    (d / "tokenizer.json").write_text(js)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True}
        for t in SPECIAL_TOKENS
    }
    tc = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": BOS,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return ids


# ---- model ----


def hf_config_for(
    arch: str,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    vocab_size: int,
    tie_word_embeddings: bool,
    dtype: str,
    bos_token_id: int = 0,
    eos_token_id: int = 2,
    max_position_embeddings: int = 2048,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json keys of a Hugging Face llama / qwen2 / mistral / deepseek_v3 model (transformers 4.57 names)."""
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    hd = head_dim or hidden_size // num_heads
    c: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch].hf_classes[0]],
        "model_type": arch,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": hd,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5 if arch == "mistral" else 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if arch == "llama":
        c.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    elif arch == "qwen2":
        c.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers})
    elif arch == "deepseek_v3":
        # a tiny DeepSeek-V3 shape: MLA with LoRA-compressed q and kv, 8 routed experts in 2 groups, 2 per token
        c.update({"num_key_value_heads": num_heads, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                  "qk_rope_head_dim": 8, "v_head_dim": 16, "rope_interleave": True, "attention_bias": False,
                  "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1,
                  "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                  "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "scoring_func": "sigmoid",
                  "topk_method": "noaux_tc", "pretraining_tp": 1})
    else:
        c.update({"sliding_window": None})
    c.update(overrides or {})
    if arch == "deepseek_v3":
        c["head_dim"] = c["qk_rope_head_dim"]  # as transformers' DeepseekV3Config writes it
    return c


def make_synthetic_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    arch: str = "llama",
    variant: str = "v8-k256-0",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    layer_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    hf_overrides: Mapping[str, Any] | None = None,
    path_layer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a complete tiny VPTQ model directory (config, weights, tokenizer) and return its path.

    `layer_kwargs` go to `VPTQLayerConfig.from_variant` (outlier_size/outlier_vector_len/num_outlier_centroids,
    group_num, enable_norm, enable_perm, is_indice_packed); linears get a bias where the architecture and config say
    (qwen2 q/k/v; llama with attention_bias/mlp_bias). `hf_overrides` replace or add config.json fields.
    `dtype` may be float32, float16 or bfloat16 (stored as bf16; generated in float32).
    """
    rng = np.random.default_rng(seed)
    gen_dtype = "float32" if dtype == "bfloat16" else dtype
    with tempfile.TemporaryDirectory(prefix=".synthetic-tok-") as tdir:
        ids = _write_tokenizer(Path(tdir), vocab_size, 2048)
        (Path(tdir) / "generation_config.json").write_text(
            json.dumps({"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "do_sample": False}, indent=2) + "\n"
        )
        hf = hf_config_for(
            arch,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
            dtype=dtype,
            bos_token_id=ids[BOS],
            eos_token_id=ids[EOS],
            overrides=hf_overrides,
        )
        kw = dict(layer_kwargs or {})

        def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
            return (mean + rng.standard_normal(shape, dtype=np.float32) * std).astype(gen_dtype)

        # small embeddings: with tied weights the last token would otherwise dominate its own logit
        emb_std = 0.5 / np.sqrt(hidden_size)
        dense: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, hidden_size), emb_std)}
        layers: dict[str, tuple[VPTQLayerConfig, dict[str, np.ndarray]]] = {}
        for path, lin in decoder_linears(hf).items():
            i_f, o_f = lin.in_features, lin.out_features
            lkw = dict(kw)
            for pattern, extra in (path_layer_kwargs or {}).items():
                if re.fullmatch(pattern, path):
                    lkw.update(extra)
            cfg = VPTQLayerConfig.from_variant(lkw.pop("variant", variant), i_f, o_f, **{"bias": lin.bias, **lkw})
            layers[path] = (cfg, random_layer(cfg, rng, gen_dtype, scale=0.5 / np.sqrt(i_f)))
        model_cfg = decoder_config_from_hf(hf)
        for i in range(num_layers):
            for name, shape in ARCHITECTURES[arch].layer_dense(model_cfg, i).items():
                if name.endswith("norm.weight"):
                    dense[name] = normal(shape, 0.05, 1.0)
                elif name.endswith("e_score_correction_bias"):  # small: the sigmoid scores still decide
                    dense[name] = normal(shape, 0.05)
                else:  # a router: logits of order 1
                    dense[name] = normal(shape, 1.0 / np.sqrt(shape[-1]))
        dense["model.norm.weight"] = normal((hidden_size,), 0.05, 1.0)
        if not tie_word_embeddings:
            dense["lm_head.weight"] = normal((vocab_size, hidden_size), 2.0 / np.sqrt(hidden_size))
        extra = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        return write_checkpoint(
            out_dir,
            hf,
            dense,
            layers,
            tokenizer_dir=tdir,
            dtype="bfloat16" if dtype == "bfloat16" else None,
            overwrite=overwrite,
            **extra,
        )
