"""Random weights for every parameter a model library declares, written as its tensor cache.

For speed benchmarks of real-shape models on a GPU host: seconds instead of generating, packing and converting
a multi-GB checkpoint. Codes are uniform over each codebook, perms are permutations, floats are small normals,
so the model runs finite numbers through every kernel the real one would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vptq_mlc.convert.chat_config import CONFIG_NAME, vptq_layer_configs
from vptq_mlc.convert.tensor_cache import TensorCacheWriter

_CODE_SIZES = {
    "codes": lambda c: c.num_centroids,
    "res_codes": lambda c: c.num_res_centroids,
    "outlier_codes": lambda c: c.num_outlier_centroids,
}


def write_random_weights(model_dir: str | Path, params: list[dict[str, Any]], seed: int = 0) -> int:
    """Write tensor-cache.json + shards for `params` (a library's `_metadata["params"]`); returns bytes written."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / CONFIG_NAME).read_text())
    layers = vptq_layer_configs(cfg)
    rng = np.random.default_rng(seed)
    with TensorCacheWriter(model_dir, metadata={"random": True}) as w:
        for p in tqdm(params, desc="random weights", unit="tensor"):
            name, shape, dtype = p["name"], [int(d) for d in p["shape"]], p["dtype"]
            path, _, leaf = name.rpartition(".")
            if leaf in _CODE_SIZES:
                a = rng.integers(0, _CODE_SIZES[leaf](layers[path]), size=shape).astype(dtype)
            elif leaf == "perm":
                a = rng.permutation(shape[0]).astype(dtype)
            elif leaf in ("col_scale", "weight"):
                base = 1.0 if (leaf == "col_scale" or "norm" in path) else 0.0
                a = (base + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
            else:
                a = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
            w.add(name, a)
    return w.total_bytes
