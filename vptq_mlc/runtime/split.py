"""Layer split across the devices of one host (`--devices cuda:0,cuda:1`): one model, consecutive layers per device.

`SplitModel` implements `library.CompiledModel` as `ModelLibrary` does, and `StagedKVCache` offers `PagedKVCache`'s
interface, so the Engine's scheduler, `eval ppl` and the server run unchanged: `func("batch_prefill")` etc.
return callables with the library's calling convention that run embed -> each stage's layers -> head, copying the
hidden states to the next device between stages. They need a library compiled with `--split-functions`
(model/split.py: per-layer-group functions that take only their own weights, `_metadata["split"]`).

- Partition (`plan_stages`): contiguous layer ranges minimizing the largest per-device weight bytes, with the
  embedding on the first device and the final norm + lm_head on the last (tied embeddings: on both).
- Each device runs its own VM instance of the one library and holds only its weights (`stream_params`, one tensor
  at a time from the shards) and a KV cache of only its layers; every add/remove/begin/end_forward goes to all
  stage caches, so their page tables stay identical.
- GPUs: kernels launch on the *current* CUDA device, so each stage's calls run after `__tvm_set_device`; the copy
  to the next GPU is followed by a sync of the source device (TVM issues it on the default stream).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm.runtime import ShapeTuple

from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.device import DeviceSpec, parse_devices
from vptq_mlc.runtime.kv_cache import PagedKVCache
from vptq_mlc.runtime.library import ModelLibrary, load_library, stream_params

log = logging.getLogger(__name__)

SPLIT_FLAG = "--split-functions"
# `(wanted _metadata.params entries, device) -> {name: Tensor}`: how one stage's weights get onto its device.
ParamLoader = Callable[[list[dict[str, Any]], Any], dict[str, Any]]
# `(model_dir, model_config) -> ParamLoader` replacing the shard reader; None: read the shards. Benchmarks of models
# bigger than the host's disk install one from above (vptq_mlc.bench.device_random.use_random_weights_on_device),
# so the runtime never imports benchmark code.
_weight_source: Callable[[str | Path, dict[str, Any] | None], ParamLoader] | None = None
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "uint32": 4, "uint16": 2, "int16": 2,
                "uint8": 1, "int8": 1, "int64": 8, "float64": 8}


def plan_stages(layer_bytes: Sequence[int], n: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Split layers 0..L-1 into `n` non-empty contiguous ranges minimizing the largest stage's bytes, where stage 0
    also carries `first_extra` (embedding) and stage n-1 `last_extra` (head). Dynamic programming, O(n L^2)."""
    num = len(layer_bytes)
    if not 1 <= n <= num:
        raise RuntimeLoadError(f"--devices lists {n} devices but the model has {num} decoder layers; "
                               f"use at most {num} devices")
    prefix = np.concatenate([[0], np.cumsum(layer_bytes, dtype=np.int64)])

    def load(stage: int, a: int, b: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == n - 1 else 0)
        return int(prefix[b] - prefix[a]) + extra

    inf = float("inf")
    # best[k][j]: smallest max load putting layers [0, j) on stages 0..k-1; cut[k][j]: where stage k-1 starts
    best = [[inf] * (num + 1) for _ in range(n + 1)]
    cut = [[0] * (num + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, num - (n - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], load(k - 1, i, j))
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds, j = [], num
    for k in range(n, 0, -1):
        bounds.append(range(cut[k][j], j))
        j = cut[k][j]
    return bounds[::-1]


def _param_bytes(p: dict[str, Any], model_config: dict[str, Any]) -> int:
    n = 1
    for d in p["shape"]:
        n *= int(model_config.get(d, 0)) if isinstance(d, str) else int(d)
    return n * _DTYPE_BYTES.get(p["dtype"], 4)


@dataclass
class Stage:
    """One device: its VM instance, its layers, its weights (packed per function) and its KV cache."""

    lib: ModelLibrary
    layers: range
    embed_params: Any = None
    head_params: Any = None
    layer_params: dict[int, Any] = field(default_factory=dict)
    kv: PagedKVCache | None = None
    _inbox: Any = None

    def handover(self, hidden: Any) -> Any:
        """A view of this stage's receive buffer shaped like `hidden` (grown when needed): copying into it avoids a
        cudaMalloc + cudaFree (which synchronizes the GPU) per step."""
        n = 1
        for d in hidden.shape:
            n *= int(d)
        if self._inbox is None or int(self._inbox.shape[0]) < n or self._inbox.dtype != hidden.dtype:
            self._inbox = tvm.runtime.empty((n,), hidden.dtype, self.lib.device)
        return self._inbox._create_view(hidden.shape)

    def activate(self) -> None:
        """Make this device current (CUDA kernels launch on the current device; a no-op for CPUs)."""
        if self.lib.spec.kind != "cpu":
            tvm.get_global_func("__tvm_set_device")(self.lib.spec.dlpack_type, self.lib.spec.index)


class SplitModel:
    """The model library's interface (`library.CompiledModel`) over several devices (see the module docstring)."""

    prefix_cacheable = False  # the stage caches do not fork sequences

    def __init__(self, lib_path: str | Path, devices: Sequence[DeviceSpec]) -> None:
        devices = parse_devices(devices)  # DeviceSpecs pass through; checks one kind, no auto
        self.path = Path(lib_path)
        libs = [load_library(lib_path, d) for d in devices]  # one VM instance per device
        self.metadata: dict[str, Any] = libs[0].metadata
        self.split: dict[str, Any] | None = self.metadata.get("split")
        if self.split is None:
            raise RuntimeLoadError(f"model library {self.path.name} has no layer-split functions; recompile it with "
                                   f"`vptq-mlc compile {SPLIT_FLAG}` to use --devices")
        self.spec, self.device = libs[0].spec, libs[0].device
        self.num_layers = int(self.split["num_layers"])
        self._params = {p["name"]: p for p in self.metadata.get("params", [])}
        self._libs = libs
        self.stages: list[Stage] = []

    # ---- weights ---------------------------------------------------------------------------------------

    def layer_param_names(self, layer: int) -> list[str]:
        group = self.split["layer_groups"][self.split["group_of_layer"][layer]]
        prefix = self.split["layer_prefix"].format(layer=layer)
        return [prefix + n for n in group["params"]]

    def plan(self, model_config: dict[str, Any] | None = None) -> list[range]:
        """The layer range of each device (balanced by weight bytes)."""
        cfg = model_config or {}

        def nbytes(names: list[str]) -> int:
            return sum(_param_bytes(self._params[n], cfg) for n in names)

        layer_bytes = [nbytes(self.layer_param_names(i)) for i in range(self.num_layers)]
        return plan_stages(layer_bytes, len(self._libs), nbytes(self.split["embed"]["params"]),
                           nbytes(self.split["head"]["params"]))

    def load_params(self, model_dir: str | Path, model_config: dict[str, Any] | None = None) -> None:
        """Plan the stages and stream each device's weights onto it. Returns None: the engine's `params` argument
        is ignored by this model's functions (each stage passes its own)."""
        ranges = self.plan(model_config)
        load: ParamLoader = lambda wanted, dev: stream_params(model_dir, wanted, dev, model_config)  # noqa: E731
        if _weight_source is not None:  # benchmarks only: no shards (see set_weight_source)
            load = _weight_source(model_dir, model_config)
        self.stages = [Stage(lib, r) for lib, r in zip(self._libs, ranges)]
        for k, st in enumerate(self.stages):
            names = [n for i in st.layers for n in self.layer_param_names(i)]
            if k == 0:
                names += self.split["embed"]["params"]
            if k == len(self.stages) - 1:
                names += self.split["head"]["params"]
            names = list(dict.fromkeys(names))
            st.activate()
            loaded = load([self._params[n] for n in names], st.lib.device)
            pack = lambda ns: tvm_ffi.convert([loaded[n] for n in ns])  # noqa: E731
            st.layer_params = {i: pack(self.layer_param_names(i)) for i in st.layers}
            if k == 0:
                st.embed_params = pack(self.split["embed"]["params"])
            if k == len(self.stages) - 1:
                st.head_params = pack(self.split["head"]["params"])
            log.info("stage %d on %s:%d: layers %d..%d, %.1f MB of weights", k, st.lib.spec.kind, st.lib.spec.index,
                     st.layers.start, st.layers.stop - 1, sum(_nbytes(t) for t in loaded.values()) / 1e6)
        return None

    def create_kv_cache(self, max_batch: int, max_total_tokens: int, prefill_chunk: int, page_size: int,
                        sliding_window: int, attention_sink: int) -> StagedKVCache:
        return StagedKVCache(self, max_batch, max_total_tokens, prefill_chunk, page_size, sliding_window,
                             attention_sink)

    def host_sampling_reason(self) -> str | None:
        return "layer-split models keep the host sampler"

    # ---- the library's calling convention ---------------------------------------------------------------

    def _kind_functions(self, kind: str) -> tuple[list[str], str] | None:
        """Layer function per group and the head function for a step kind ("prefill", "decode", "decode_b<n>")."""
        if kind in ("prefill", "decode"):
            return [g[kind] for g in self.split["layer_groups"]], self.split["head"][kind]
        n = kind[len("decode_b"):]
        if n in self.split["head"]["decode_static"] and all(n in g["decode_static"]
                                                            for g in self.split["layer_groups"]):
            return [g["decode_static"][n] for g in self.split["layer_groups"]], self.split["head"]["decode_static"][n]
        return None

    @staticmethod
    def _kind(name: str) -> str | None:
        if name == "batch_prefill":
            return "prefill"
        if name == "batch_decode":
            return "decode"
        if name == "decode":
            return "decode_b1"
        if name.startswith("batch_decode_b") and name[14:].isdigit():
            return f"decode_b{name[14:]}"
        return None

    def has(self, name: str) -> bool:
        if name == "embed":
            return True
        kind = self._kind(name)
        return kind is not None and self._kind_functions(kind) is not None

    def func(self, name: str) -> Callable[..., Any]:
        """`embed(ids, params)`, `batch_prefill(emb, pos, kv, params)`, `batch_decode`/`decode`/`batch_decode_b<n>`
        `(emb, kv, params)`; `kv` is what `StagedKVCache.forward` yields, `params` is ignored."""
        if not self.has(name):
            raise RuntimeLoadError(f"the layer split of {self.path.name} has no function {name!r}")
        if name == "embed":
            return self._embed
        kind = self._kind(name)
        if kind == "prefill":
            return lambda emb, pos, kv, _params: self._forward(kind, emb, kv, pos)
        return lambda emb, kv, _params: self._forward(kind, emb, kv, None)

    def _embed(self, ids: Any, _params: Any) -> Any:
        st = self.stages[0]
        st.activate()
        return st.lib.vm[self.split["embed"]["function"]](ids, st.embed_params)

    def _forward(self, kind: str, hidden: Any, kvs: list[Any], pos: Any) -> tuple[Any]:
        layer_fns, head_fn = self._kind_functions(kind)
        groups = self.split["group_of_layer"]
        prev: Stage | None = None
        for st, kv in zip(self.stages, kvs):
            st.activate()
            if prev is not None:
                hidden = hidden.copyto(st.handover(hidden))  # the hand-over between devices
                if prev.lib.spec.kind != "cpu":
                    prev.lib.device.sync()  # the peer copy ran on the source's stream: finish it before we read
            vm = st.lib.vm
            for i in st.layers:
                hidden = vm[layer_fns[groups[i]]](hidden, kv, ShapeTuple([i]), st.layer_params[i])
            prev = st
        last = self.stages[-1]
        if pos is None:
            return (last.lib.vm[head_fn](hidden, last.head_params),)
        if pos.device != last.lib.device:
            pos = pos.copyto(last.lib.device)
        return (last.lib.vm[head_fn](hidden, pos, last.head_params),)


def set_weight_source(source: Callable[[str | Path, dict[str, Any] | None], ParamLoader] | None) -> None:
    """Install (or with None remove) a weight source used by every later `SplitModel.load_params` instead of
    reading the model dir's shards."""
    global _weight_source
    _weight_source = source


def _nbytes(t: Any) -> int:
    n = 1
    for d in t.shape:
        n *= int(d)
    return n * _DTYPE_BYTES.get(str(t.dtype), 4)


class StagedKVCache:
    """`PagedKVCache`'s interface over one cache per stage (each holding its own layers), kept in lockstep."""

    def __init__(self, model: SplitModel, max_batch: int, max_total_tokens: int, prefill_chunk: int,
                 page_size: int = 16, sliding_window: int = -1, attention_sink: int = -1) -> None:
        self.model = model
        self.caches: list[PagedKVCache] = []
        for st in model.stages:
            st.activate()
            st.kv = PagedKVCache(st.lib, max_batch, max_total_tokens, prefill_chunk, page_size, sliding_window,
                                 attention_sink, layers=(st.layers.start, st.layers.stop))
            self.caches.append(st.kv)
        self.page_size = page_size
        self.total_pages = self.caches[0].total_pages

    def _each(self, fn: Callable[[PagedKVCache], Any]) -> None:
        for st, c in zip(self.model.stages, self.caches):
            st.activate()
            fn(c)

    def pages_for(self, tokens: int) -> int:
        return self.caches[0].pages_for(tokens)

    def available_pages(self) -> int:
        return self.caches[0].available_pages()

    def total_tokens(self) -> int:
        return self.caches[0].total_tokens()

    def add(self, seq_id: int) -> None:
        self._each(lambda c: c.add(seq_id))

    def remove(self, seq_id: int) -> None:
        self._each(lambda c: c.remove(seq_id))

    def clear(self) -> None:
        self._each(lambda c: c.clear())

    @contextlib.contextmanager
    def forward(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> Iterator[list[Any]]:
        """begin_forward on every stage cache; yields their objects in stage order; end_forward on all."""
        ids, lens = ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths))
        begun: list[tuple[Stage, PagedKVCache]] = []
        try:
            for st, c in zip(self.model.stages, self.caches):
                st.activate()
                c._begin(c.obj, ids, lens)
                begun.append((st, c))
            yield [c.obj for c in self.caches]
        finally:  # as PagedKVCache.forward: keep every cache usable after a failed call
            for st, c in begun:
                st.activate()
                c._end(c.obj)
