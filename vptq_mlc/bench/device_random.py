"""Random weights made directly on a layer-split stage's device: no shards, no disk, no host copy of the model.

For speed benchmarks of models too big for the GPU host's disk or for one device (the 405B shape: ~110 GB at 2
bits). After `use_random_weights_on_device(seed)`, `SplitModel.load_params` uses this instead of reading shards
(`runtime/split.py: set_weight_source`): each stage gets exactly the tensors of its layers, one tensor at a time,
drawn like `vptq-mlc bench random-weights` draws them (`random_weights.random_kind`).

Why tiling: numpy fills ~0.5 GB/s on one core, so 110 GB would take minutes; instead a tensor larger than
`SMALL` elements is filled with device-to-device copies of one random block per (kind, dtype) already on that
device (memory bandwidth: well under a second per GPU). Codes stay below their codebook size and floats small,
so every kernel runs on finite numbers; the repetition across a tensor does not change the work done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.bench.random_weights import random_array, random_kind
from vptq_mlc.runtime import split
from vptq_mlc.runtime.library import _resolve_shape

log = logging.getLogger(__name__)

SMALL = 1 << 20  # elements: tensors up to this size are drawn whole in numpy (norms, perms, codebooks)
BLOCK = 1 << 24  # elements of the tiled block (32 MB of fp16; copies land on aligned offsets)


class DeviceRandom:
    """Draws tensors onto one device; keeps one random block per (kind, dtype) there for tiling."""

    def __init__(self, device: tvm.runtime.Device, layers: dict[str, Any], seed: int = 0) -> None:
        self.device = device
        self.layers = layers
        self.rng = np.random.default_rng([seed, int(device.dlpack_device_type()), device.index])
        self._blocks: dict[tuple[Any, ...], Any] = {}

    def _block(self, kind: tuple[str, float], dtype: str) -> Any:
        key = (*kind, dtype)
        if key not in self._blocks:
            block = tvm.runtime.empty((BLOCK,), dtype, self.device)
            block.copyfrom(random_array(kind, [BLOCK], dtype, self.rng))
            self._blocks[key] = block
        return self._blocks[key]

    def tensor(self, name: str, shape: list[int], dtype: str) -> Any:
        """A new tensor on the device; created empty there, then filled (host memory: at most one block)."""
        kind = random_kind(name, self.layers)
        n = int(np.prod(shape, dtype=np.int64))
        t = tvm.runtime.empty(shape, dtype, self.device)
        if n <= SMALL or kind[0] == "perm":
            t.copyfrom(random_array(kind, shape, dtype, self.rng))
            return t
        block = self._block(kind, dtype)
        itemsize = tvm_ffi.dtype(dtype).itemsize
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            src = block if m == BLOCK else block._create_view((m,))
            src.copyto(t._create_view((m,), relative_byte_offset=start * itemsize))
        return t


def random_params(wanted: list[dict[str, Any]], device: tvm.runtime.Device, layers: dict[str, Any],
                  model_config: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """name -> random Tensor on `device` for the `_metadata.params` entries in `wanted` (stream_params' contract)."""
    gen = DeviceRandom(device, layers, seed)
    out = {p["name"]: gen.tensor(p["name"], _resolve_shape(p["shape"], model_config or {}), p["dtype"])
           for p in wanted}
    device.sync()  # the fills are queued copies: a load time measured after this is the real one
    return out


def use_random_weights_on_device(seed: int = 0) -> None:
    """Make every later layer-split engine draw its weights on its devices (`random_params`) instead of reading
    shards, so a config-only model dir suffices."""

    def source(model_dir: str | Path, model_config: dict[str, Any] | None) -> split.ParamLoader:
        log.warning("RANDOM weights (seed %d) made on the devices; %s's weights are not read", seed, model_dir)
        layers = ChatConfig.load(model_dir).vptq_layers()
        return lambda wanted, dev: random_params(wanted, dev, layers, model_config, seed)

    split.set_weight_source(source)
