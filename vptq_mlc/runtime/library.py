"""Load a compiled model library (.so) into a Relax VM and its weights from the MLC tensor cache.

The sequence mirrors MLC-LLM's C++ engine (docs/mlc-artifacts.md §3-§5): load_module ->
vm_load_executable -> vm_initialization(dev, pooled allocator, host cpu) -> `_metadata` JSON ->
tensor_cache.load + param_array_from_cache_by_name(_metadata.params names) + tensor_cache.clear.
Every failure a user can fix becomes a one-line RuntimeLoadError.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np
import tvm

from vptq_mlc.artifact import sampler_abi
from vptq_mlc.artifact.checksum import read_sidecar, sha256_file, sidecar_path
from vptq_mlc.artifact.files import TENSOR_CACHE
from vptq_mlc.artifact.tensor_cache import read_index
from vptq_mlc.checkpoint.mla import MLA_TENSOR_SUFFIXES
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.device import DeviceLike, DeviceSpec, resolve_device

log = logging.getLogger(__name__)

POOLED_ALLOCATOR = 2
# What the engine calls (docs/ARCHITECTURE.md, "Model library interface"); checked at load time.
REQUIRED_FUNCTIONS = ("embed", "batch_prefill", "batch_decode", "create_tir_paged_kv_cache")
MLA_PAGE_SIZE = 16  # TVM 0.27 builds its MLA attention kernel for this page size (_attention_prefill_mla)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (TVM errors carry long backtraces)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


@runtime_checkable
class CompiledModel(Protocol):
    """What the engine calls on a loaded model, whether one library on one device (`ModelLibrary`) or the layer
    split over several (`runtime/split.py: SplitModel`), so the scheduler has one code path for both."""

    metadata: dict[str, Any]  # the library's `_metadata`
    device: tvm.runtime.Device  # where inputs go and logits come out (a split: its first device)
    prefix_cacheable: bool  # whether its KV cache can fork sequences (`PrefixCache`)

    def has(self, name: str) -> bool: ...

    def func(self, name: str) -> Callable[..., Any]:
        """A function with the library's calling convention (docs/ARCHITECTURE.md, "Model library interface")."""
        ...

    def load_params(self, model_dir: str | Path, model_config: dict[str, Any] | None = None) -> Any:
        """Put the weights on the device(s); returns the `params` argument of the functions."""
        ...

    def create_kv_cache(self, max_batch: int, max_total_tokens: int, prefill_chunk: int, page_size: int,
                        sliding_window: int, attention_sink: int) -> Any:
        """A KV cache with `PagedKVCache`'s interface."""
        ...

    def host_sampling_reason(self) -> str | None:
        """Why logits must be sampled on the host (numpy), or None when the model samples on its device."""
        ...


@dataclass
class ModelLibrary:
    """An initialised VM module plus the library's `_metadata` (the single-device `CompiledModel`)."""

    path: Path
    spec: DeviceSpec
    device: tvm.runtime.Device
    vm: tvm.runtime.Module
    metadata: dict[str, Any]
    prefix_cacheable = True

    def has(self, name: str) -> bool:
        return bool(self.vm.implements_function(name))

    def func(self, name: str) -> Any:
        """A VM function by name; a missing one is a RuntimeLoadError naming the library."""
        if not self.has(name):
            raise RuntimeLoadError(
                f"model library {self.path.name} has no function {name!r}; rebuild it with `vptq-mlc compile`"
            )
        return self.vm[name]

    def load_params(self, model_dir: str | Path, model_config: dict[str, Any] | None = None) -> Any:
        return load_params(model_dir, self, model_config)

    def create_kv_cache(self, max_batch: int, max_total_tokens: int, prefill_chunk: int, page_size: int,
                        sliding_window: int, attention_sink: int) -> Any:
        from vptq_mlc.runtime.kv_cache import PagedKVCache  # kv_cache builds on this module

        if self.metadata.get("kv_cache", {}).get("attn_kind") == "mla" and page_size != MLA_PAGE_SIZE:
            raise RuntimeLoadError(f"{self.path.name} uses the MLA KV cache, whose TVM kernels are built for pages of "
                                   f"{MLA_PAGE_SIZE} tokens; use page size {MLA_PAGE_SIZE}")
        return PagedKVCache(self, max_batch, max_total_tokens, prefill_chunk, page_size, sliding_window,
                            attention_sink)

    def host_sampling_reason(self) -> str | None:
        if self.has(sampler_abi.FUNCTION):
            return None
        return f"the library predates {sampler_abi.FUNCTION}; recompile it to sample on the device"


ELF_MAGIC = b"\x7fELF"
SHT_NOBITS = 8  # a section with no bytes in the file (.bss)
PT_LOAD = 1


def _elf_problem(f: BinaryIO, size: int) -> str | None:
    """Why the open file `f` of `size` bytes cannot be a whole ELF shared library, or None. Checks what the dynamic
    loader trusts: the header tables, every loaded segment and every section lie inside the file (a truncated
    library is otherwise mapped past its end, and the first touch of such a page kills the process with SIGBUS)."""
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != ELF_MAGIC:
        return "not an ELF shared library"
    if ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return f"unknown ELF class/byte order ({ident[4]}/{ident[5]})"
    wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
    header = struct.Struct(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
    raw = f.read(header.size)
    if len(raw) < header.size:
        return f"{size} bytes is shorter than an ELF header"
    _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = header.unpack(raw)
    prog = struct.Struct(order + ("IIQQQQQQ" if wide else "IIIIIIII"))
    sect = struct.Struct(order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII"))
    tables = (("program header", phoff, phentsize, phnum, prog), ("section header", shoff, shentsize, shnum, sect))
    for what, off, entsize, num, entry in tables:
        if num == 0:
            continue
        if entsize < entry.size or off + entsize * num > size:
            return f"its {what} table ends at byte {off + entsize * num}, past the end of the file ({size} bytes)"
        f.seek(off)
        table = f.read(entsize * num)
        for i in range(num):
            fields = entry.unpack_from(table, i * entsize)
            if what == "program header":
                start, length = (fields[2], fields[5]) if wide else (fields[1], fields[4])
                if fields[0] != PT_LOAD:
                    continue
            else:
                start, length = fields[4], fields[5]
                if fields[1] == SHT_NOBITS:
                    continue
            if start + length > size:
                kind = "loaded segment" if what == "program header" else "section"
                return f"{kind} {i} ends at byte {start + length}, past the end of the file ({size} bytes)"
    return None


def check_library_file(path: Path) -> None:
    """Refuse a model library that is not a whole ELF shared object before `dlopen` maps it (Linux only: elsewhere
    the platform's loader format differs and its own error is kept)."""
    if not sys.platform.startswith("linux"):
        return
    with open(path, "rb") as f:
        why = _elf_problem(f, os.fstat(f.fileno()).st_size)
    if why is not None:
        raise RuntimeLoadError(f"model library {path} is truncated or corrupt ({why}); copy it again or rebuild it "
                               "with `vptq-mlc compile`")


def check_library_checksum(path: Path) -> None:
    """Compare the library's bytes with the sha256 `compile` recorded next to it (`<library>.sha256`). Bytes
    overwritten in place leave a valid ELF that crashes the process once its code runs; this finds them before
    `dlopen`. Libraries built before the sidecar existed have none and load as before."""
    fix = "re-run `vptq-mlc compile` for this model (or restore the library from a good copy)"
    try:
        recorded = read_sidecar(path)
    except (OSError, ValueError) as e:
        raise RuntimeLoadError(f"cannot read the checksum of model library {path}: {e}; {fix}") from None
    if recorded is None:
        log.info("%s has no %s checksum file (built by an older vptq-mlc); loading it unchecked",
                 path.name, sidecar_path(path).suffix)
        return
    actual = sha256_file(path)
    if actual != recorded:
        raise RuntimeLoadError(
            f"model library {path} does not match its checksum {sidecar_path(path).name} (sha256 {actual[:12]}.. != "
            f"{recorded[:12]}..): the file was modified or damaged after it was built; {fix}"
        )


def load_library(lib_path: str | Path, device: DeviceLike = "cpu") -> ModelLibrary:
    """Load `lib_path` for `device` (a DeviceSpec, None = auto, or "cpu", "cuda:0", "auto", ...) and read its
    `_metadata`."""
    path = Path(lib_path)
    if not path.is_file():
        raise RuntimeLoadError(f"model library not found: {path}; pass --lib or run `vptq-mlc compile` first")
    check_library_file(path)
    check_library_checksum(path)
    spec, dev = resolve_device(device)  # loads the CUDA plugin when needed, before load_module
    if spec.kind == "cpu":
        pin_cpu_thread_count()
    try:
        mod = tvm.runtime.load_module(str(path))
    except Exception as e:  # noqa: BLE001 - TVM raises many types here; all mean "cannot load this file"
        raise RuntimeLoadError(
            f"cannot load model library {path}: {first_line(e)}; was it built for {spec.kind} with this TVM?"
        ) from e
    if not mod.implements_function("vm_load_executable"):
        raise RuntimeLoadError(
            f"{path} is not a Relax VM library (kind {mod.kind!r}); build it with `vptq-mlc compile`"
        )
    vm = mod["vm_load_executable"]()
    init_args = [spec.dlpack_type, spec.index, POOLED_ALLOCATOR]
    init_args += [DeviceSpec("cpu").dlpack_type, 0, POOLED_ALLOCATOR]  # host device for shapes / small tensors
    vm["vm_initialization"](*init_args)
    if not vm.implements_function("_metadata"):
        raise RuntimeLoadError(
            f"model library {path.name} has no _metadata function; rebuild it with `vptq-mlc compile`"
        )
    metadata = json.loads(str(vm["_metadata"]()))
    check_cpu_features(path, metadata)
    lib = ModelLibrary(path, spec, dev, vm, metadata)
    for name in REQUIRED_FUNCTIONS:
        lib.func(name)
    log.info("loaded %s on %s (%d params)", path.name, spec, len(metadata.get("params", [])))
    return lib


def pin_cpu_thread_count() -> None:
    """Set TVM_NUM_THREADS, when neither it nor OMP_NUM_THREADS is set, to the size TVM's CPU thread pool has
    anyway, and give the calling thread back the CPUs it could run on.

    Why: without either variable, every parallel loop a CPU kernel starts asks the OS for the online CPUs again
    (TVM's MaxConcurrency, via std::thread::hardware_concurrency: an open and read of
    /sys/devices/system/cpu/online), about 160 times per decode step of a 30-layer model. And creating the pool
    pins the calling thread to the pool's "big" cores, on a VM with one pool thread to CPU 0 alone: every thread
    the process starts afterwards (torch's, the server's) would then share that one core, and decode could not move
    off a core another process keeps busy."""
    num_threads = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    if num_threads is None:
        return
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pool_size = int(num_threads())  # creates this thread's pool (and pins the thread)
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(pool_size)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def check_cpu_features(path: Path, metadata: dict[str, Any]) -> None:
    """A CPU library may use instructions this CPU lacks (compiled for another host or a higher x86-64 level):
    refuse it here, before any kernel runs, instead of dying of SIGILL in the first one."""
    target = metadata.get("target") or {}
    if target.get("kind") != "llvm":
        return
    from vptq_mlc.artifact.cpu_features import missing_features

    missing = missing_features(target.get("cpu_features", []), target.get("machine"))
    if missing:
        raise RuntimeLoadError(
            f"model library {path.name} was compiled for CPU {target.get('arch')} ({target.get('mcpu')}) and needs "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}, which this CPU lacks; rebuild it here "
            "(vptq-mlc compile MODEL --target llvm) or use a portable build (--arch x86-64-v2 / x86-64-v3)"
        )


def _resolve_shape(shape: list[Any], model_config: dict[str, Any]) -> list[int | str]:
    """Turn symbolic dims (e.g. "vocab_size") into numbers from mlc-chat-config's `model_config`."""
    return [model_config.get(d, d) if isinstance(d, str) else int(d) for d in shape]


def _checked_records(model_dir: Path, wanted: list[dict[str, Any]],
                     model_config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """name -> tensor-cache record (plus `dataPath`) of every weight in `wanted` (`_metadata.params` entries), after
    checking that each exists with the shape and dtype the library expects."""
    index = model_dir / TENSOR_CACHE
    stored = read_index(model_dir)  # every record checked against its shard (ModelDirError) before TVM's loader
    missing = [p["name"] for p in wanted if p["name"] not in stored]
    absorbed = [name for name in missing if name.endswith(MLA_TENSOR_SUFFIXES)]
    if absorbed:
        raise RuntimeLoadError(
            f"{index} lacks {absorbed[0]} (kv_b_proj absorbed for the MLA KV cache the library uses); re-run "
            "`vptq-mlc convert` (it writes them), or compile the library with --kv-cache mha"
        )
    if missing:
        raise RuntimeLoadError(
            f"{len(missing)} weights the library needs are not in {index} (first: {missing[0]}); "
            "the library and the weights come from different models: re-run convert/compile"
        )
    for p in wanted:
        want = _resolve_shape(p["shape"], model_config or {})
        have = stored[p["name"]]
        if want != list(have["shape"]) or p["dtype"] != have["dtype"]:
            raise RuntimeLoadError(
                f"weight {p['name']} is {have['dtype']}{list(have['shape'])} in {index.name} but the library "
                f"expects {p['dtype']}{want}; the library and weights do not match: re-run convert/compile"
            )
    return stored


def load_params(model_dir: str | Path, lib: ModelLibrary, model_config: dict[str, Any] | None = None) -> Any:
    """Load the weights named in `_metadata.params` from `model_dir`'s tensor cache onto the library's device.

    Returns the ffi Array passed as the packed params argument. Shapes and dtypes are checked against
    `_metadata` so a library/weights mismatch is caught here, not as a crash inside a kernel.
    """
    model_dir = Path(model_dir)
    wanted = lib.metadata.get("params", [])
    _checked_records(model_dir, wanted, model_config)
    g = tvm.get_global_func
    try:
        g("vm.builtin.tensor_cache.load")(str(model_dir), lib.spec.dlpack_type, lib.spec.index)
        params = g("vm.builtin.param_array_from_cache_by_name")([p["name"] for p in wanted])
    except Exception as e:  # noqa: BLE001 - corrupted shards surface as TVM errors
        raise RuntimeLoadError(
            f"cannot read weights from {model_dir}: {first_line(e)}; re-run `vptq-mlc convert`"
        ) from e
    finally:
        g("vm.builtin.tensor_cache.clear")()
    return params


def _host_array(model_dir: Path, rec: dict[str, Any]) -> np.ndarray:
    """One stored tensor as a numpy array over the memory-mapped shard (read from disk as the device copy goes)."""
    data = np.memmap(model_dir / rec["dataPath"], dtype=np.uint8, mode="r", offset=int(rec["byteOffset"]),
                     shape=(int(rec["nbytes"]),))
    shape = [int(d) for d in rec["shape"]]
    if rec["dtype"] == "float32" and rec.get("format") == "f32-to-bf16":  # widened as TVM's reader does
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if rec["dtype"] == "bfloat16":
        import ml_dtypes  # installed with apache-tvm; only bf16 weights need it

        return data.view(ml_dtypes.bfloat16).reshape(shape)
    dtype = np.dtype(rec["dtype"])
    return data.view(dtype).reshape(shape)


def stream_params(model_dir: str | Path, wanted: list[dict[str, Any]], device: tvm.runtime.Device,
                  model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """name -> Tensor on `device` for the `_metadata.params` entries in `wanted`, one tensor at a time.

    Why not `vm.builtin.tensor_cache.load`: it reads every shard of the model onto one device, while a layer-split
    stage needs only its own weights, and a 405B-sized model fits neither one GPU nor host memory at once. Here
    host memory holds at most one tensor's pages (memory-mapped) and each device only the tensors asked for.
    """
    model_dir = Path(model_dir)
    stored = _checked_records(model_dir, wanted, model_config)
    out: dict[str, Any] = {}
    try:
        for p in wanted:
            rec = stored[p["name"]]
            host = _host_array(model_dir, rec)
            t = tvm.runtime.empty(host.shape, rec["dtype"], device)
            t.copyfrom(host)
            out[p["name"]] = t
    except (OSError, ValueError) as e:
        raise RuntimeLoadError(
            f"cannot read weights from {model_dir}: {first_line(e)}; re-run `vptq-mlc convert`"
        ) from e
    return out
