"""`vptq-mlc convert`: a VPTQ checkpoint directory -> an MLC model directory (weights, config, tokenizer).

Tensors stream one layer at a time from the checkpoint into tensor-cache shards, so the model is never held
in memory twice. Output goes to a temporary sibling directory that is renamed only when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vptq_mlc.artifact.tensor_cache import TensorCacheWriter
from vptq_mlc.artifact.vq_layout import CODE_SORTED, LAYOUT, code_sorted_eligible, code_sorted_layout, generic_layout
from vptq_mlc.atomic import atomic_dir
from vptq_mlc.checkpoint.arch import decoder_config_from_hf
from vptq_mlc.checkpoint.dequant import decode_codes
from vptq_mlc.checkpoint.reader import VPTQCheckpoint
from vptq_mlc.convert.chat_config import build_chat_config
from vptq_mlc.errors import ConvertError

log = logging.getLogger(__name__)
SUPPORTED_DTYPES = ("float16", "float32")


def default_dtype(checkpoint_dtype: str) -> str:
    """fp32 checkpoints stay fp32; fp16/bf16 run as fp16 (TVM's CPU and GPU kernels both support it)."""
    return "float32" if checkpoint_dtype == "float32" else "float16"


LAYOUT_CHOICES = ("auto", LAYOUT)


def _tensor_groups(ckpt: VPTQCheckpoint, dtype: str, code_sorted: bool) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Per dense tensor or VPTQ layer, its (name, array) pairs in tensor-cache form: dense tensors cast to the
    model dtype, VPTQ layers in the generic layout, plus the code-sorted entries of layers whose codebooks do not
    fit shared memory (when `code_sorted`)."""
    for name in ckpt.dense_tensor_names():
        a = ckpt.get(name)
        yield [(name, a.astype(np.float32).astype(dtype) if a.dtype.kind == "f" else a)]
    for path, cfg in ckpt.layers.items():
        tensors = ckpt.layer_tensors(path)
        codes = decode_codes(cfg, tensors, path)
        layout = generic_layout(cfg, tensors, codes, dtype)
        if code_sorted and code_sorted_eligible(cfg, dtype):
            layout.update(code_sorted_layout(cfg, codes, dtype))
        yield [(f"{path}.{suffix}", a) for suffix, a in layout.items()]


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
) -> Path:
    """Convert and return the output directory. Raises CheckpointError / ConvertError with one-line messages.

    `layout`: "auto" also writes the code-sorted entries (4 bytes per code) of layers whose codebooks do not fit
    shared memory (K = 65536 class; the CUDA decode kernel for batch 1..2 reads them); "generic" writes only
    the generic layout (smaller, every target still runs, CUDA decode then gathers through L2)."""
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
        n_total = len(ckpt.dense_tensor_names()) + len(ckpt.layers)
        with TensorCacheWriter(tmp, metadata={"quantization": "vptq"}) as writer:
            groups = _tensor_groups(ckpt, dtype, layout == "auto")
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
            layouts=(LAYOUT, CODE_SORTED) if layout == "auto" and any(
                code_sorted_eligible(c, dtype) for c in ckpt.layers.values()) else (LAYOUT,),
        )
        chat_cfg.write(tmp)
    log.info("converted %s -> %s (%d tensors, %.1f MB)", checkpoint, out, writer.num_tensors, writer.total_bytes / 1e6)
    return out
