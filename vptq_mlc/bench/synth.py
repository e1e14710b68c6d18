"""Synthetic models with real shapes for end-to-end benchmarks (random codes: speed, not quality).

A 7B-class model is gigabytes, so it is never carried to a GPU host: the library is compiled on the build box
from a *config-only* model dir (mlc-chat-config.json + tokenizer, no weights), and the same seeded checkpoint is
generated and converted on the GPU host, where the runtime checks the weights against the library's _metadata.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from vptq_mlc.atomic import atomic_dir
from vptq_mlc.checkpoint.synthetic import make_synthetic_checkpoint
from vptq_mlc.convert.chat_config import CONFIG_NAME
from vptq_mlc.convert.converter import convert_checkpoint

# name -> (arch, hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES = {
    "llama2-7b": ("llama", 4096, 11008, 32, 32, 32, 32000),
    "llama3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064),
    "llama2-13b": ("llama", 5120, 13824, 40, 40, 40, 32000),
}


def synth_model(out: str | Path, shape: str, variant: str, *, layers: int | None = None, config_only: bool = False,
                context_window: int = 2048, seed: int = 0) -> Path:
    """Write the converted (MLC) model dir of a synthetic `shape` model quantized as `variant`."""
    arch, hidden, inter, n_layers, heads, kv_heads, vocab = SHAPES[shape]
    n_layers = layers or n_layers
    with tempfile.TemporaryDirectory(prefix="vptq-synth-") as tmp:
        ckpt = make_synthetic_checkpoint(
            Path(tmp) / "ckpt", arch=arch, variant=variant, hidden_size=hidden, intermediate_size=inter,
            num_layers=1 if config_only else n_layers, num_heads=heads, num_kv_heads=kv_heads, vocab_size=vocab,
            dtype="float16", seed=seed,
        )
        model = convert_checkpoint(ckpt, Path(tmp) / "mlc", dtype="float16", context_window_size=context_window,
                                   validate=False)
        with atomic_dir(out) as dst:
            for f in model.iterdir():
                if config_only and (f.name.startswith("params_shard_") or f.name == "tensor-cache.json"):
                    continue
                shutil.copy2(f, dst / f.name)
            if config_only:  # one converted layer's configs stand for every layer (all layers have one shape)
                cfg = json.loads((dst / CONFIG_NAME).read_text())
                one = {k.removeprefix("model.layers.0."): v for k, v in cfg["vptq"]["layers"].items()}
                cfg["vptq"]["layers"] = {f"model.layers.{i}.{k}": v for i in range(n_layers) for k, v in one.items()}
                cfg["model_config"]["num_hidden_layers"] = n_layers
                (dst / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    return Path(out)
