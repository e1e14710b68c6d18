"""Synthetic models with real shapes for end-to-end benchmarks (random codes: speed, not quality).

A 7B-class model is gigabytes, so it is never carried to a GPU host: the library is compiled on the build box
from a *config-only* model dir (mlc-chat-config.json + tokenizer, no weights), and the same seeded checkpoint is
generated and converted on the GPU host, where the runtime checks the weights against the library's _metadata.
A model too big for the GPU host's disk (the 405B shape: ~110 GB at 2 bits) gets its random weights made directly on
the devices instead (`bench/device_random.py`, layer split only).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vptq_mlc.artifact.files import CHAT_CONFIG, SHARD_PREFIX, TENSOR_CACHE
from vptq_mlc.atomic import atomic_dir
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

# name -> (arch, hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES = {
    "llama2-7b": ("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "llama2-13b": ("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama3.1-405b": ("llama", 16384, 53248, 126, 128, 8, 128256),
}
# What a shape needs beyond SHAPES. `rope_theta`: the real model's RoPE base (written into the converted config).
# `max_batch_size`: the converted config's (small for models that only just fit several GPUs). `config_only_vocab`:
# a config-only dir is generated with this vocabulary (tokenizer + the throw-away embeddings) and only its config
# says the real one: the 405B's 128k-token tokenizer (~17 MB) would not fit the carry limit, and its throw-away
# fp16 embeddings are 8 GB. Token ids past the tokenizer's vocabulary then decode to nothing (bench prompts are ids).
# `sampling`: the instruct model's generation_config.json defaults (`--sampling model` in bench e2e samples with them).
CHAT_SAMPLING = {"temperature": 0.6, "top_p": 0.9}  # Llama-2-chat, Llama-3.1-Instruct
SHAPE_EXTRAS: dict[str, dict[str, Any]] = {
    "llama2-7b": {"sampling": CHAT_SAMPLING},
    "llama2-13b": {"sampling": CHAT_SAMPLING},
    "llama3.1-8b": {"rope_theta": 500000.0, "sampling": CHAT_SAMPLING},
    "qwen2.5-7b": {"rope_theta": 1000000.0,
                   "sampling": {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}},  # Qwen2.5-Instruct
    "llama3.1-405b": {"rope_theta": 500000.0, "max_batch_size": 4, "config_only_vocab": 4096,
                      "sampling": CHAT_SAMPLING},
}


def synth_model(out: str | Path, shape: str, variant: str, *, layers: int | None = None, config_only: bool = False,
                context_window: int = 2048, seed: int = 0) -> Path:
    """Write the converted (MLC) model dir of a synthetic `shape` model quantized as `variant`."""
    arch, hidden, inter, n_layers, heads, kv_heads, vocab = SHAPES[shape]
    extras = SHAPE_EXTRAS.get(shape, {})
    n_layers = layers or n_layers
    gen_vocab = min(vocab, extras.get("config_only_vocab", vocab)) if config_only else vocab
    with tempfile.TemporaryDirectory(prefix="vptq-synth-") as tmp:
        ckpt = make_synthetic_checkpoint(
            Path(tmp) / "ckpt", arch=arch, variant=variant, hidden_size=hidden, intermediate_size=inter,
            num_layers=1 if config_only else n_layers, num_heads=heads, num_kv_heads=kv_heads, vocab_size=gen_vocab,
            dtype="float16", seed=seed,
        )
        model = convert_checkpoint(ckpt, Path(tmp) / "mlc", dtype="float16", context_window_size=context_window,
                                   max_batch_size=extras.get("max_batch_size"), validate=False)
        with atomic_dir(out) as dst:
            for f in model.iterdir():
                if config_only and (f.name.startswith(SHARD_PREFIX) or f.name == TENSOR_CACHE):
                    continue
                shutil.copy2(f, dst / f.name)
            if config_only:  # one converted layer's configs stand for every layer (all layers have one shape)
                cfg = json.loads((dst / CHAT_CONFIG).read_text())
                one = {k.removeprefix("model.layers.0."): v for k, v in cfg["vptq"]["layers"].items()}
                cfg["vptq"]["layers"] = {f"model.layers.{i}.{k}": v for i in range(n_layers) for k, v in one.items()}
                cfg["model_config"]["num_hidden_layers"] = n_layers
                (dst / CHAT_CONFIG).write_text(json.dumps(cfg, indent=2))
            _apply_extras(dst / CHAT_CONFIG, extras, vocab)
    return Path(out)


def _apply_extras(config_path: Path, extras: dict[str, Any], vocab: int) -> None:
    """The real model's RoPE base, vocabulary size and default sampling in the converted config (see SHAPE_EXTRAS)."""
    cfg = json.loads(config_path.read_text())
    if "rope_theta" in extras:
        cfg["model_config"]["position_embedding_base"] = float(extras["rope_theta"])
    cfg.update(extras.get("sampling", {}))
    for d in (cfg, cfg["model_config"]):
        d["vocab_size"] = vocab
    if "active_vocab_size" in cfg:
        cfg["active_vocab_size"] = vocab
    config_path.write_text(json.dumps(cfg, indent=2))
