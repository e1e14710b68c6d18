"""`vptq-mlc quantize`: a dense model in, a VPTQ-community checkpoint out.

Dense source (hf_import) -> optional calibration Hessians (hessian) -> every q/k/v/o/gate/up/down linear of
the first `layers` decoder layers through `quantize_linear` -> `checkpoint.writer.write_checkpoint` (atomic;
embeddings, norms and any unquantized linears stay dense, stored in fp16 like the published checkpoints).
Each linear draws from its own generator seeded by (seed, module path), so a run is reproducible and
quantizing only the first N layers gives those layers exactly as the full run would.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vptq_mlc.cache import cache_root
from vptq_mlc.checkpoint.arch import decoder_linears, detect_arch, num_layers
from vptq_mlc.checkpoint.layer_config import Variant
from vptq_mlc.checkpoint.writer import write_checkpoint
from vptq_mlc.errors import QuantizeError
from vptq_mlc.progress import progress_bar, stage
from vptq_mlc.quantize import nn_kernel
from vptq_mlc.quantize.hf_import import resolve_dense_model
from vptq_mlc.quantize.kmeans import KMeansOptions
from vptq_mlc.quantize.linear import LinearQuantOptions, quantize_linear

log = logging.getLogger(__name__)


@dataclass
class QuantizeSettings:
    variant: str = "v8-k4096-4096"
    seed: int = 0
    hessian: bool = True
    calib: str | None = None  # text spec for data.corpus.load_text; None = its CALIB_DEFAULT
    calib_tokens: int = 8192
    calib_seq_len: int = 512
    layers: int | None = None  # quantize only the first N decoder layers
    enable_norm: bool = False  # measured worse on SmolLM2 (bench/QUALITY.md); the published recipe uses it
    enable_perm: bool = True
    group_num: int = 1
    outlier_size: int = 0
    outlier_vector_len: int = 4
    outlier_centroids: int = 256
    kmeans_iters: int = 8
    points_per_centroid: int = 8
    device: str | None = None  # torch device for k-means and assignment; default cuda if available, else cpu


@dataclass
class QuantizeReport:
    out_dir: Path
    seconds: float
    layers: int
    mean_proxy_error: float
    index_bits_per_weight: float  # nominal (log2 K + log2 Kr) / v
    stored_bits_per_weight: float  # quantized linears incl. codebooks, norm, perm (fp16)
    per_layer: dict[str, float] = field(default_factory=dict)


def _load_dense(model_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantizeError(f"{model_dir} has no .safetensors weights; convert the model to safetensors first")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return config, tensors


def _generator(seed: int, path: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(path.encode())) % (1 << 63))


def quantize_model(model: str | Path, out_dir: str | Path, settings: QuantizeSettings,
                   progress: bool = True) -> QuantizeReport:
    """Quantize `model` (HF dir, .gguf or alias) into a VPTQ checkpoint at `out_dir`."""
    t0 = time.time()
    variant = Variant.parse(settings.variant)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"{out} already exists; choose another output directory or remove it")
    model_dir = resolve_dense_model(model)
    config, dense = _load_dense(model_dir)
    detect_arch(config)
    total_layers = num_layers(config)
    n = total_layers if settings.layers is None else settings.layers
    if not 1 <= n <= total_layers:
        raise QuantizeError(f"--layers {n} out of range: the model has {total_layers} decoder layers")
    paths = list(decoder_linears({**config, "num_hidden_layers": n}))
    missing = [p for p in paths if f"{p}.weight" not in dense]
    if missing:
        raise QuantizeError(f"{model_dir} lacks {missing[0]}.weight; is it a dense (unquantized) model?")

    hessians: dict[str, torch.Tensor] = {}
    if settings.hessian:
        from vptq_mlc.data.corpus import CALIB_DEFAULT, load_text
        from vptq_mlc.quantize.hessian import collect_hessians

        text = load_text(settings.calib, default=CALIB_DEFAULT)
        stage("collecting calibration Hessians over %d tokens", settings.calib_tokens)
        hessians = collect_hessians(
            model_dir, text, n, n_tokens=settings.calib_tokens, seq_len=settings.calib_seq_len,
            cache_dir=cache_root() / "hessians", progress=progress,
        )

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = LinearQuantOptions(
        variant=variant,
        enable_norm=settings.enable_norm,
        enable_perm=settings.enable_perm,
        group_num=settings.group_num,
        outlier_size=settings.outlier_size,
        outlier_vector_len=settings.outlier_vector_len,
        outlier_centroids=settings.outlier_centroids,
        kmeans=KMeansOptions(iters=settings.kmeans_iters, points_per_centroid=settings.points_per_centroid),
    )
    layers: dict[str, tuple] = {}
    errors: dict[str, float] = {}
    stored_bits = 0
    n_weights = 0
    torch_threads = torch.get_num_threads()
    nn_kernel.set_num_threads(torch_threads)
    torch.set_num_threads(1)  # small per-column ops; the search kernel gets the cores
    try:
        for path in progress_bar(paths, desc=f"quantize {variant.name}", unit="linear", disable=not progress):
            W = dense.pop(f"{path}.weight")
            b = dense.pop(f"{path}.bias", None)
            H = hessians.get(path)
            q = quantize_linear(
                W.to(device), H.to(device) if H is not None else None, opts, _generator(settings.seed, path),
                bias=b.to(device) if b is not None else None, where=path,
            )
            layers[path] = (q.cfg, q.tensors)
            errors[path] = q.proxy_error
            log.info("%s: proxy error %.4g (%.0f s elapsed)", path, q.proxy_error, time.time() - t0)
            stored_bits += q.cfg.stored_bits()
            n_weights += q.cfg.in_features * q.cfg.out_features
    finally:
        torch.set_num_threads(torch_threads)
        nn_kernel.set_num_threads(None)

    dense_np = {k: v.to(torch.float16).numpy() if v.is_floating_point() else v.numpy() for k, v in dense.items()}
    meta = {k: v for k, v in asdict(settings).items() if k != "device"}
    meta.update({"source": str(model_dir), "tool": "vptq-mlc quantize"})
    hf_config = dict(config)
    hf_config.pop("dtype", None)
    hf_config["vptq_mlc_quantize"] = meta
    stage("writing the checkpoint %s", out)
    write_checkpoint(out, hf_config, dense_np, layers, tokenizer_dir=model_dir, dtype="float16")
    report = QuantizeReport(
        out_dir=out,
        seconds=time.time() - t0,
        layers=len(layers),
        mean_proxy_error=float(np.mean(list(errors.values()))),
        index_bits_per_weight=variant.nominal_bits,
        stored_bits_per_weight=stored_bits / max(n_weights, 1),
        per_layer=errors,
    )
    log.info("quantized %d linears in %.1f s", report.layers, report.seconds)
    return report
