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


def random_kind(name: str, layers: dict[str, Any]) -> tuple[str, float]:
    """How a parameter is drawn: ("codes", codebook size), ("perm", 0) or ("normal", mean) with std 0.02.

    `layers`: `vptq_layer_configs` of the model (codebook sizes of each linear)."""
    path, _, leaf = name.rpartition(".")
    if leaf in _CODE_SIZES:
        return "codes", _CODE_SIZES[leaf](layers[path])
    if leaf == "perm":
        return "perm", 0
    if leaf in ("col_scale", "weight"):
        return "normal", 1.0 if (leaf == "col_scale" or "norm" in path) else 0.0
    return "normal", 0.0


def random_array(kind: tuple[str, float], shape: list[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """A host array of `kind` (see random_kind); a "perm" of shape [n] is a permutation of 0..n-1."""
    what, arg = kind
    if what == "codes":
        return rng.integers(0, int(arg), size=shape).astype(dtype)
    if what == "perm":
        return rng.permutation(shape[0]).astype(dtype)
    return (arg + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def write_random_weights(model_dir: str | Path, params: list[dict[str, Any]], seed: int = 0) -> int:
    """Write tensor-cache.json + shards for `params` (a library's `_metadata["params"]`); returns bytes written."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / CONFIG_NAME).read_text())
    layers = vptq_layer_configs(cfg)
    rng = np.random.default_rng(seed)
    with TensorCacheWriter(model_dir, metadata={"random": True}) as w:
        for p in tqdm(params, desc="random weights", unit="tensor"):
            shape = [int(d) for d in p["shape"]]
            w.add(p["name"], random_array(random_kind(p["name"], layers), shape, p["dtype"], rng))
    return w.total_bytes
