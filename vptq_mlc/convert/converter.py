"""`vptq-mlc convert`: a VPTQ checkpoint directory -> an MLC model directory (weights, config, tokenizer).

Tensors stream one layer at a time from the checkpoint into tensor-cache shards, so the model is never held
in memory twice. Output goes to a temporary sibling directory that is renamed only when complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vptq_mlc.artifact.expert_stack import expert_stacks, stack_layouts, stacked_members
from vptq_mlc.artifact.tensor_cache import TensorCacheWriter
from vptq_mlc.artifact.vq_layout import CODE_SORTED, LAYOUT, code_sorted_eligible, code_sorted_layout, generic_layout
from vptq_mlc.atomic import atomic_dir
from vptq_mlc.checkpoint.arch import ARCHITECTURES, DecoderConfig, DeepseekV3Config, decoder_config_from_hf
from vptq_mlc.checkpoint.dequant import LayerCodes, decode_codes, dequantize
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.mla import absorbed_kv_b, absorbed_names
from vptq_mlc.checkpoint.reader import VPTQCheckpoint
from vptq_mlc.convert.chat_config import build_chat_config
from vptq_mlc.errors import ConvertError

log = logging.getLogger(__name__)
SUPPORTED_DTYPES = ("float16", "float32")


def default_dtype(checkpoint_dtype: str) -> str:
    """fp32 checkpoints stay fp32; fp16/bf16 run as fp16 (TVM's CPU and GPU kernels both support it)."""
    return "float32" if checkpoint_dtype == "float32" else "float16"


LAYOUT_CHOICES = ("auto", LAYOUT)
EMBEDDING = "model.embed_tokens.weight"


KV_B = re.compile(r"model\.layers\.(\d+)\.self_attn\.kv_b_proj(\.weight)?$")


def _absorbed(cfg: DecoderConfig | None, name: str, weight: np.ndarray, dtype: str) -> list[tuple[str, np.ndarray]]:
    """For a deepseek_v3 `kv_b_proj` (its dense weight, read or dequantized), the MLA cache's W_UK / W_UV
    (checkpoint/mla.py) in the model dtype; nothing for other tensors and architectures."""
    match = KV_B.match(name)
    if not isinstance(cfg, DeepseekV3Config) or match is None:
        return []
    w_uk, w_uv = absorbed_kv_b(weight.astype(np.float32), cfg.num_attention_heads, cfg.qk_nope_head_dim,
                               cfg.v_head_dim)
    uk_name, uv_name = absorbed_names(int(match.group(1)))
    return [(uk_name, w_uk.astype(dtype)), (uv_name, w_uv.astype(dtype))]


def _tensor_groups(ckpt: VPTQCheckpoint, dtype: str, code_sorted: bool, embedding_dtype: str,
                   codebook_dtype: str,
                   model_cfg: DecoderConfig | None = None) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Per dense tensor or VPTQ layer, its (name, array) pairs in tensor-cache form: dense tensors cast to the
    model dtype (the embedding table to `embedding_dtype`), VPTQ layers in the generic layout (codebooks in
    `codebook_dtype`), plus the code-sorted entries of layers whose codebooks do not fit shared memory (when
    `code_sorted`). Routed experts that stack (`artifact/expert_stack.py`) come as one group per stack, written
    once its last member is read (generic layout only: the gathered kernels read no code-sorted entries).
    deepseek_v3's `kv_b_proj` group also carries its absorbed W_UK / W_UV (`_absorbed`)."""
    keep_fp32 = ARCHITECTURES[ckpt.arch].float32_dense
    for name in ckpt.dense_tensor_names():
        a = ckpt.get(name)
        to = "float32" if name.endswith(keep_fp32) else embedding_dtype if name == EMBEDDING else dtype
        yield [(name, a.astype(np.float32).astype(to) if a.dtype.kind == "f" else a),
               *_absorbed(model_cfg, name, a, dtype)]
    stack_of = {m: s for s in expert_stacks(ckpt.layers).values() for m in s.members}
    pending: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for path, cfg in ckpt.layers.items():
        tensors = ckpt.layer_tensors(path)
        codes = decode_codes(cfg, tensors, path)
        layout = generic_layout(cfg, tensors, codes, dtype)
        layout.update({k: a.astype(codebook_dtype) for k, a in layout.items() if k.endswith("centroids")})
        stack = stack_of.get(path)
        if stack is not None:
            got = pending.setdefault(stack.path, {})
            got[path] = layout
            if len(got) == stack.matrices:
                del pending[stack.path]
                stacked = stack_layouts([got[m] for m in stack.members])
                yield [(f"{stack.path}.{suffix}", a) for suffix, a in stacked.items()]
            continue
        if code_sorted and code_sorted_eligible(cfg, dtype):
            layout.update(code_sorted_layout(cfg, codes, dtype))
        absorbed = _absorbed(model_cfg, path, dequantize(cfg, tensors, path), dtype) if KV_B.match(path) else []
        yield [(f"{path}.{suffix}", a) for suffix, a in layout.items()] + absorbed


def convert_checkpoint(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    max_batch_size: int | None = None,
    overwrite: bool = False,
    validate: bool = True,
    layout: str = "auto",
    embedding_dtype: str | None = None,
    codebook_dtype: str | None = None,
) -> Path:
    """Convert and return the output directory. Raises CheckpointError / ConvertError with one-line messages.

    `layout`: "auto" also writes the code-sorted entries (4 bytes per code) of layers whose codebooks do not fit
    shared memory (K = 65536 class; the CUDA decode kernel for batch 1..2 reads them); "generic" writes only
    the generic layout (smaller, every target still runs, CUDA decode then gathers through L2).

    `embedding_dtype`: the stored dtype of the embedding table (default: the model dtype). float16 in a float32
    model halves the bytes the tied head streams per token (the largest tensor of a small model); rows and logits
    are still computed in fp32 (ChatConfig.embedding_dtype). `codebook_dtype`: the same for the VQ codebooks
    (every quantized linear reads its whole codebooks per token); only the CPU kernel reads narrower codebooks, so
    such a model dir gets the generic layout only and compiles for llvm only (ChatConfig.codebook_dtype)."""
    if layout not in LAYOUT_CHOICES:
        raise ConvertError(f"layout {layout!r} is not supported; choose one of {', '.join(LAYOUT_CHOICES)}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise ConvertError(f"output directory {out} exists; remove it or pass --overwrite")
    ckpt = VPTQCheckpoint.open(checkpoint)
    if validate:
        ckpt.validate(progress=True)
    dtype = dtype or default_dtype(ckpt.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}")
    embedding_dtype, codebook_dtype = embedding_dtype or dtype, codebook_dtype or dtype
    for what, value in (("embedding", embedding_dtype), ("codebook", codebook_dtype)):
        if value not in SUPPORTED_DTYPES:
            raise ConvertError(f"{what} dtype {value!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}")
    code_sorted = layout == "auto" and codebook_dtype == dtype  # code-sorted entries: CUDA only
    model_config = decoder_config_from_hf(ckpt.hf_config)
    if context_window_size:
        model_config.set_context_window(context_window_size)
    model_config.prefill_chunk_size = min(prefill_chunk_size or model_config.prefill_chunk_size,
                                          model_config.context_window_size)
    if max_batch_size:
        model_config.max_batch_size = max_batch_size

    with atomic_dir(out) as tmp:
        tok_files = []
        for f in ckpt.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
            tok_files.append(f.name)
        stacks = expert_stacks(ckpt.layers)
        n_total = (len(ckpt.dense_tensor_names()) + len(ckpt.layers) + len(stacks)
                   - sum(s.matrices for s in stacks.values()))
        unstacked = {p: c for p, c in ckpt.layers.items() if p not in stacked_members(ckpt.layers)}
        with TensorCacheWriter(tmp, metadata={"quantization": "vptq"}) as writer:
            groups = _tensor_groups(ckpt, dtype, code_sorted, embedding_dtype, codebook_dtype, model_config)
            for group in tqdm(groups, total=n_total, desc="convert", unit="tensor"):
                for name, a in group:
                    writer.add(name, a)
        chat_cfg = build_chat_config(
            arch=ckpt.arch,
            model_config=model_config,
            layers=ckpt.layers,
            dtype=dtype,
            hf_config=ckpt.hf_config,
            source_dir=ckpt.path,
            out_dir=tmp,
            tokenizer_files=tok_files,
            layouts=(LAYOUT, CODE_SORTED) if code_sorted and any(
                code_sorted_eligible(c, dtype) for c in unstacked.values()) else (LAYOUT,),
        )
        if embedding_dtype != dtype:
            chat_cfg.vptq["embedding_dtype"] = embedding_dtype
        if codebook_dtype != dtype:
            chat_cfg.vptq["codebook_dtype"] = codebook_dtype
        chat_cfg.write(tmp)
    log.info("converted %s -> %s (%d tensors, %.1f MB)", checkpoint, out, writer.num_tensors, writer.total_bytes / 1e6)
    return out


def _codes_from_generic(codes_2d: np.ndarray, cfg: VPTQLayerConfig) -> np.ndarray:
    """`<path>.codes` [N, G*S] (generic layout) back to [G, N, S] (`LayerCodes`)."""
    n = codes_2d.shape[0]
    return codes_2d.reshape(n, cfg.group_num, cfg.group_size).transpose(1, 0, 2).astype(np.int64)


def add_code_sorted_tensors(model_dir: str | os.PathLike[str]) -> int:
    """Add the code-sorted entries (layout `code-sorted`) to a model dir converted with the generic layout only;
    returns the number of layers that got them (0: nothing to add, or already there).

    Why at compile time: only the CUDA decode reads these entries (+4 bytes per code), so `convert` writes the
    generic layout by default and `compile --target cuda` adds them where its routing wants them: the result is the
    model dir `convert --layout auto` writes. The entries are computed from the stored generic codes; new shards and
    then tensor-cache.json (one rename) and mlc-chat-config.json (one rename) are written, so an interruption leaves
    a dir that is either unchanged or still generic-only in its config (the next compile then only fixes the config).
    """
    import json

    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.artifact.files import CHAT_CONFIG, TENSOR_CACHE
    from vptq_mlc.artifact.tensor_cache import append_tensors, read_index, read_tensor
    from vptq_mlc.atomic import atomic_file

    model_dir = Path(model_dir)
    chat = ChatConfig.load(model_dir)
    if CODE_SORTED in chat.layouts:
        return 0
    dtype = chat.model_dtype
    layers = chat.vptq_layers()
    stacked = stacked_members(layers)  # routed experts in a stack: read by the gathered kernels only
    eligible = {p: c for p, c in layers.items() if p not in stacked and code_sorted_eligible(c, dtype)}
    if not eligible:
        return 0
    if (model_dir / TENSOR_CACHE).is_file():  # config-only dirs (weights made on the deploy host) get the config only
        index = read_index(model_dir)
        todo = {p: c for p, c in eligible.items() if f"{p}.cs_entries" not in index}

        def entries() -> Iterator[tuple[str, np.ndarray]]:
            for path, cfg in tqdm(todo.items(), desc="code-sorted entries", unit="layer"):
                idx = _codes_from_generic(read_tensor(model_dir, index[f"{path}.codes"]), cfg)
                res = (_codes_from_generic(read_tensor(model_dir, index[f"{path}.res_codes"]), cfg)
                       if cfg.has_residual else None)
                for suffix, a in code_sorted_layout(cfg, LayerCodes(idx, res, None, None), dtype).items():
                    yield f"{path}.{suffix}", a

        try:
            added = append_tensors(model_dir, entries()) if todo else 0
        except KeyError as e:
            raise ConvertError(f"{model_dir} lacks the generic tensor {e.args[0]}; re-run `vptq-mlc convert`") from None
        log.info("added %.1f MB of code-sorted entries for %d layers to %s", added / 1e6, len(todo), model_dir)
    chat.vptq = {**chat.vptq, "layouts": [LAYOUT, CODE_SORTED]}
    with atomic_file(model_dir / CHAT_CONFIG) as tmp:
        tmp.write_text(json.dumps(chat.to_json(), indent=2))
    return len(eligible)
