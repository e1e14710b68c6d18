"""Random weights for every parameter a model library declares, written as its tensor cache.

For speed benchmarks of real-shape models on a GPU host: seconds instead of generating, packing and converting
a multi-GB checkpoint. Codes are uniform over each codebook, perms are permutations, floats are small normals,
so the model runs finite numbers through every kernel the real one would. Code-sorted tensors (`cs_*`) are the
converter's layout of uniform random codes (valid lists, the real distribution of entries over slices); layers
of one config share one such draw, since building the lists costs about a second per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.artifact.tensor_cache import TensorCacheWriter
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

_CODE_SIZES = {
    "codes": lambda c: c.num_centroids,
    "res_codes": lambda c: c.num_res_centroids,
    "outlier_codes": lambda c: c.num_outlier_centroids,
}


def random_kind(name: str, layers: dict[str, Any]) -> tuple[str, float]:
    """How a parameter is drawn: ("codes", codebook size), ("perm", 0) or ("normal", mean) with std 0.02.

    `layers`: `ChatConfig.vptq_layers()` of the model (codebook sizes of each linear)."""
    path, _, leaf = name.rpartition(".")
    if leaf in _CODE_SIZES:
        if path not in layers:  # stacked routed experts (artifact/expert_stack.py): expert 0's config is all's
            prefix, _, stack = path.rpartition(".")
            path = f"{prefix}.0.{'gate_proj' if stack == 'gate_up_proj' else stack}"
        return "codes", _CODE_SIZES[leaf](layers[path])
    if leaf == "perm":
        return "perm", 0
    if leaf.startswith("cs_"):
        return "code-sorted", 0
    if leaf in ("col_scale", "weight"):
        return "normal", 1.0 if (leaf == "col_scale" or "norm" in path) else 0.0
    return "normal", 0.0


def random_array(kind: tuple[str, float], shape: list[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """A host array of `kind` (see random_kind); a "perm" of shape [n] is a permutation of 0..n-1."""
    what, arg = kind
    if what == "code-sorted":
        raise ValueError("code-sorted tensors come from a whole layer's codes: use RandomTensors.tensor")
    if what == "codes":
        return rng.integers(0, int(arg), size=shape).astype(dtype)
    if what == "perm":
        return rng.permutation(shape[0]).astype(dtype)
    return (arg + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


class RandomTensors:
    """`tensor(name, shape, dtype)` for every parameter kind, code-sorted ones included (cached per layer config)."""

    def __init__(self, layers: dict[str, Any], rng: np.random.Generator, model_dtype: str = "float16"):
        self.layers, self.rng, self.model_dtype = layers, rng, model_dtype
        self._code_sorted: dict[str, dict[str, np.ndarray]] = {}

    def tensor(self, name: str, shape: list[int], dtype: str) -> np.ndarray:
        kind = random_kind(name, self.layers)
        if kind[0] != "code-sorted":
            return random_array(kind, shape, dtype, self.rng)
        path, _, leaf = name.rpartition(".")
        out = self._layout(self.layers[path])[leaf]
        if list(out.shape) != shape or out.dtype != np.dtype(dtype):
            raise ValueError(f"{name}: the layout gives {out.dtype}{list(out.shape)}, the library wants {dtype}{shape}")
        return out

    def _layout(self, cfg: VPTQLayerConfig) -> dict[str, np.ndarray]:
        from vptq_mlc.artifact.vq_layout import code_sorted_layout
        from vptq_mlc.checkpoint.dequant import LayerCodes

        key = json.dumps(cfg.to_json(), sort_keys=True)
        if key not in self._code_sorted:
            size = (cfg.group_num, cfg.num_vectors, cfg.group_size)
            idx = self.rng.integers(0, cfg.num_centroids, size=size)
            res = self.rng.integers(0, cfg.num_res_centroids, size=size) if cfg.has_residual else None
            self._code_sorted[key] = code_sorted_layout(cfg, LayerCodes(idx, res, None, None), self.model_dtype)
        return self._code_sorted[key]


def write_random_weights(model_dir: str | Path, params: list[dict[str, Any]], seed: int = 0) -> int:
    """Write tensor-cache.json + shards for `params` (a library's `_metadata["params"]`); returns bytes written."""
    model_dir = Path(model_dir)
    chat = ChatConfig.load(model_dir)
    draw = RandomTensors(chat.vptq_layers(), np.random.default_rng(seed), chat.model_dtype)
    with TensorCacheWriter(model_dir, metadata={"random": True}) as w:
        for p in tqdm(params, desc="random weights", unit="tensor"):
            w.add(p["name"], draw.tensor(p["name"], [int(d) for d in p["shape"]], p["dtype"]))
    return w.total_bytes
