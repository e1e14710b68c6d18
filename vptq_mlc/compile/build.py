"""`vptq-mlc compile`: an MLC model directory + a target -> model library (.so), ahead of time.

Steps: read mlc-chat-config.json -> build the module tree with the target's kernels -> export with MLC's
function names -> check the parameters against the tensor cache -> add the sampler (compile/sampler.py) -> lower
(relax pipeline) -> attach `_metadata` with planned memory -> build and export to a temporary file renamed at the
end.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import tvm
from tvm import relax

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.artifact.checksum import write_sidecar
from vptq_mlc.artifact.files import TENSOR_CACHE
from vptq_mlc.artifact.tensor_cache import read_index
from vptq_mlc.atomic import atomic_file
from vptq_mlc.checkpoint.arch import ARCHITECTURES, model_config_from_json
from vptq_mlc.checkpoint.mla import MLA_TENSOR_SUFFIXES
from vptq_mlc.compile.backend import TargetBackend
from vptq_mlc.compile.metadata import attach_metadata, model_metadata, planned_memory
from vptq_mlc.compile.sampler import add_sampler
from vptq_mlc.compile.targets import resolve_backend
from vptq_mlc.errors import CompileError
from vptq_mlc.model.builder import build_model
from vptq_mlc.model.config import DecoderConfig
from vptq_mlc.progress import stage

log = logging.getLogger(__name__)


def _upper_bounds(mod: tvm.IRModule, cfg: DecoderConfig) -> tvm.IRModule:
    """Bound symbolic dims so static memory planning can size every buffer (as MLC does)."""
    bounds = {
        "seq_len": cfg.prefill_chunk_size,
        "batch_size": cfg.max_batch_size,
        "total_seq_len": cfg.context_window_size,
    }
    funcs = {
        gv: f.with_attr("tir_var_upper_bound", bounds).with_attr("tir_non_negative_var", ["seq_len", "batch_size"])
        if isinstance(f, relax.Function)
        else f
        for gv, f in mod.functions.items()
    }
    return tvm.IRModule(funcs, attrs=mod.attrs)


KV_CACHE_CHOICES = ("auto", "mla", "mha")
# `--kv-cache auto` picks the latent cache for deepseek_v3 where TVM has its kernels (cuda, rocm): the MLA library
# passed tests/gpu/test_deepseek_mla_gpu.py on an H100 (docs/architectures.md), and it caches 85x fewer bytes per
# token for R1 than the decompressed MHA cache.
LATENT_BY_DEFAULT = True


def latent_kv_cache(kv_cache: str, arch: str, bt: TargetBackend) -> bool:
    """Whether the library uses TVM's latent (MLA) KV cache: `--kv-cache mla` asks for it (deepseek_v3 on cuda or
    rocm, where TVM has its kernels), `mha` keeps the decompressed per-head cache, `auto` is mla where
    LATENT_BY_DEFAULT and TVM allows it, else mha."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise CompileError(f"--kv-cache {kv_cache!r} is not supported; choose one of {', '.join(KV_CACHE_CHOICES)}")
    has_mla = arch == "deepseek_v3"
    if kv_cache == "mla" and not has_mla:
        raise CompileError(f"--kv-cache mla is for deepseek_v3 models (MLA attention); {arch} has none: use "
                           "--kv-cache auto or mha")
    if kv_cache == "mla" and not bt.latent_kv_cache:
        raise CompileError(f"--kv-cache mla needs a GPU target (cuda, rocm): TVM 0.27 has no {bt.kind} kernels for "
                           "the MLA cache; use --kv-cache mha")
    if kv_cache == "auto":
        return LATENT_BY_DEFAULT and has_mla and bt.latent_kv_cache
    return kv_cache == "mla"


def _check_params(params: list, model_dir: Path) -> None:
    if not (model_dir / TENSOR_CACHE).is_file():  # a config-only dir (weights made on the deploy host)
        log.warning("%s has no tensor-cache.json: weights will be checked against _metadata at load time", model_dir)
        return
    index = read_index(model_dir)
    for name, p in params:
        rec = index.get(name)
        want = ([int(d) for d in p.shape], p.dtype)
        if rec is None and name.endswith(MLA_TENSOR_SUFFIXES):
            raise CompileError(f"weight {name} (kv_b_proj absorbed for the MLA cache) is missing from {model_dir}: "
                               "re-run `vptq-mlc convert` (it writes them), or compile with --kv-cache mha")
        if rec is None:
            raise CompileError(f"weight {name} is missing from {model_dir}/tensor-cache.json; re-run convert")
        if (rec["shape"], rec["dtype"]) != want:
            raise CompileError(
                f"weight {name}: tensor cache has {rec['dtype']}{rec['shape']}, model expects {want[1]}{want[0]}; "
                "re-run convert"
            )


def library_prefill_chunk(configured: int, context_window: int, bt: TargetBackend, asked: int | None = None) -> int:
    """Prefill tokens per call the library is built for: `asked` (compile --prefill-chunk), else the model dir's,
    raised to the target's `default_prefill_chunk`; never more than the context window."""
    if asked is not None and asked <= 0:
        raise CompileError(f"--prefill-chunk {asked}: give a positive number of tokens")
    if asked is None and bt.default_prefill_chunk <= configured:
        return configured
    chunk = asked if asked is not None else bt.default_prefill_chunk
    return max(1, min(chunk, context_window))


def build_library(model_dir: Path, bt: TargetBackend, output: Path,
                  static_batches: tuple[int, ...] | None = None, split_functions: bool = False,
                  cuda_graph: bool | None = None, prefill_chunk: int | None = None,
                  kv_cache: str = "auto") -> Path:
    """`split_functions`: also emit the per-layer functions of the layer split across devices (model/split.py);
    off by default since they roughly double the compile time. `cuda_graph`: TVM's RewriteCUDAGraph lifts the
    static-shape kernel runs between KV-cache calls into CUDA graphs captured on the first call (the backends
    with `cuda_graph`: cuda; default on there: +25% batch-1 decode on the H100, bench/RESULTS.md). Not with
    `split_functions`: RewriteCUDAGraph treats the packed parameters as static, so one layer-group function called
    with each layer's weights would replay the graph captured with the first layer's. `kv_cache`: see
    `latent_kv_cache`."""
    if cuda_graph and split_functions:
        raise CompileError("--cuda-graph cannot be combined with --split-functions (the per-layer functions would "
                           "replay a graph captured with another layer's weights); drop one of them")
    chat = ChatConfig.load(model_dir)
    chat.check_buildable()
    arch = chat.model_type or "llama"
    cfg = model_config_from_json(arch, chat.model_config)
    cfg.prefill_chunk_size = library_prefill_chunk(cfg.prefill_chunk_size, cfg.context_window_size, bt,
                                                   prefill_chunk)
    if split_functions and not ARCHITECTURES[arch].supports_split:
        raise CompileError(f"--split-functions is not supported for {arch} models yet; compile without it")
    latent = latent_kv_cache(kv_cache, arch, bt)
    dtype = chat.model_dtype
    layers = chat.vptq_layers()
    stage("compile %s for %s%s -> %s%s", model_dir, bt.label, f" ({', '.join(bt.archs)})" if bt.archs else "", output,
          " (latent MLA KV cache)" if latent else "")
    bt.prepare()
    t0 = time.time()
    if static_batches is None:
        static_batches = bt.static_decode_batches
    selector = bt.kernel_selector(chat.layouts)
    if chat.codebook_dtype != dtype:
        if not bt.narrow_codebooks:
            raise CompileError(f"{model_dir} stores its codebooks in {chat.codebook_dtype} (a CPU model dir); "
                               f"re-run `vptq-mlc convert` without a codebook dtype to compile for {bt.kind}")
        selector.codebook_dtype = chat.codebook_dtype
    model = build_model(cfg, layers, dtype, bt.target, selector, static_batches,
                        bt.norm_bias_kernels(), arch=arch, logits_dtype=bt.logits_dtype,
                        embedding_dtype=chat.embedding_dtype, codebook_dtype=chat.codebook_dtype,
                        latent_kv_cache=latent)
    split = None
    stage("  exporting the model (%d quantized linears)%s", len(layers),
          " with split functions" if split_functions else "")
    if split_functions:
        from vptq_mlc.model.split import export_with_split

        mod, params, split = export_with_split(model, model.get_default_spec())
    else:
        mod, params = model.export_tvm(spec=model.get_default_spec())
    _check_params(params, model_dir)
    if bt.has_sampler:
        mod = add_sampler(mod, bt.target)  # sampling on the device: logits never cross to the host
    mod = _upper_bounds(mod, cfg)
    if cuda_graph is None:
        cuda_graph = bt.cuda_graph and not split_functions
    config = {"relax.backend.use_cuda_graph": True} if cuda_graph and bt.cuda_graph else {}
    stage("  lowering (relax pipeline for %s)", bt.kind)
    with bt.target, tvm.transform.PassContext(config=config):
        lowered = bt.relax_pipeline()(mod)
    meta = model_metadata(
        model_type=chat.model_type,
        quantization=chat.quantization,
        cfg=cfg,
        params=params,
        memory_usage=planned_memory(lowered),
        split=split,
        target=bt.metadata,
        latent_kv_cache=latent,
    )
    lowered = attach_metadata(lowered, meta)
    stage("  generating code%s", bt.codegen_note())
    executable = relax.build(lowered, bt.target, relax_pipeline=None)
    stage("  linking the library")
    with atomic_file(output, mode=0o755) as tmp:
        executable.export_library(str(tmp))
    write_sidecar(output)  # after the library: a sidecar never describes a library that is not (yet) there
    stage("  built %s in %.1f s", output, time.time() - t0)
    return output


def default_library_path(model_dir: Path, bt: TargetBackend) -> Path:
    return Path(model_dir) / f"{Path(model_dir).resolve().name}-{bt.label}.so"


def compile_model(
    model_dir: str | os.PathLike[str], target: str = "llvm", output: str | os.PathLike[str] | None = None,
    arch: str | None = None, static_batches: tuple[int, ...] | None = None, split_functions: bool = False,
    cuda_graph: bool | None = None, prefill_chunk: int | None = None, kv_cache: str = "auto",
) -> list[Path]:
    """Build one library per target backend; `output` names the file (one target) or a directory (several).
    `static_batches`: batch sizes that get a static `batch_decode_b<n>` (default: the target's choice).
    `split_functions`: add the layer-split functions (`--devices` at run time). `cuda_graph`, `kv_cache`: see
    build_library. `prefill_chunk`: prefill tokens per call (default: `library_prefill_chunk`'s choice for the
    target)."""
    model_dir = Path(model_dir)
    ChatConfig.load(model_dir).check_buildable()  # fail early with the convert hint
    targets = resolve_backend(target, arch)
    if any(bt.code_sorted_tensors for bt in targets):  # CUDA decode of large codebooks reads code-sorted entries
        from vptq_mlc.convert.converter import add_code_sorted_tensors

        if layers := add_code_sorted_tensors(model_dir):
            stage("added code-sorted entries for %d layers to %s (CUDA decode of large codebooks)", layers, model_dir)
    if arch is None and any(bt.archs for bt in targets):
        stage("no --arch given: building for %s (pick others with --arch)",
              ", ".join(a for bt in targets for a in bt.archs))
    outs = []
    for bt in targets:
        if output is None:
            path = default_library_path(model_dir, bt)
        elif len(targets) > 1 or Path(output).is_dir():
            path = Path(output) / default_library_path(model_dir, bt).name
        else:
            path = Path(output)
        outs.append(build_library(model_dir, bt, path, static_batches, split_functions, cuda_graph, prefill_chunk,
                                  kv_cache))
    return outs
