"""`vptq-mlc inspect`: what a VPTQ checkpoint holds and how big it is, from headers only (plus optional validation).

Sizes are the stored bytes of each tensor class (codes, codebooks, other per-layer tensors such as perm/norm/bias,
dense tensors) compared with the same model stored densely in fp16.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.reader import VPTQCheckpoint

_CODE_NAMES = ("indices", "res_indices", "outlier_indices")
_BOOK_NAMES = ("centroids.weight", "res_centroids.weight", "outlier_centroids.weight")
_LAYER_NUM = re.compile(r"\.layers\.(\d+)\.")
_EXPERT_NUM = re.compile(r"\.experts\.(\d+)\.")  # a mixture of experts' copies fold like the layers


@dataclass
class LayerRow:
    path: str
    out_features: int
    in_features: int
    variant: str
    flags: str
    nominal_bits: float
    bits_per_weight: float  # all stored bytes of the layer / weights


@dataclass
class Summary:
    path: str
    arch: str
    dtype: str
    num_layers: int
    variants: dict[str, int]
    layers: list[LayerRow] = field(default_factory=list)
    index_bytes: int = 0
    codebook_bytes: int = 0
    other_layer_bytes: int = 0
    dense_bytes: int = 0
    quantized_weights: int = 0
    dense_params: int = 0

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.codebook_bytes + self.other_layer_bytes + self.dense_bytes

    @property
    def fp16_bytes(self) -> int:
        return 2 * (self.quantized_weights + self.dense_params)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fp16_bytes=self.fp16_bytes)
        return d


def _flags(cfg: VPTQLayerConfig) -> str:
    f = []
    if cfg.has_outliers:
        f.append(f"outliers{cfg.outlier_size}(v{cfg.outlier_vector_len}k{cfg.num_outlier_centroids})")
    if cfg.group_num > 1:
        f.append(f"G{cfg.group_num}")
    f += [n for n, on in (("perm", cfg.enable_perm), ("norm", cfg.enable_norm), ("bias", cfg.bias)) if on]
    f.append("packed" if cfg.is_indice_packed else "unpacked")
    return ",".join(f)


def summarize(ck: VPTQCheckpoint) -> Summary:
    """Per-layer rows and byte totals, from the safetensors headers only."""
    s = Summary(str(ck.path), ck.arch, ck.dtype, int(ck.hf_config.get("num_hidden_layers", 0)),
                dict(Counter(c.variant.name for c in ck.layers.values())))
    for path, cfg in ck.layers.items():
        nbytes = 0
        for name in ck.tensor_names():
            if not name.startswith(path + "."):
                continue
            short, b = name[len(path) + 1 :], ck.tensor_info(name).nbytes
            nbytes += b
            if short in _CODE_NAMES:
                s.index_bytes += b
            elif short in _BOOK_NAMES:
                s.codebook_bytes += b
            else:
                s.other_layer_bytes += b
        n = cfg.in_features * cfg.out_features
        s.quantized_weights += n
        s.layers.append(LayerRow(path, cfg.out_features, cfg.in_features, cfg.variant.name, _flags(cfg),
                                 cfg.variant.nominal_bits, 8 * nbytes / n))
    for name in ck.dense_tensor_names():
        info = ck.tensor_info(name)
        s.dense_bytes += info.nbytes
        num = 1
        for d in info.shape:
            num *= d
        s.dense_params += num
    return s


def _mb(b: int) -> str:
    return f"{b / 2**20:,.2f} MiB"


def format_summary(s: Summary, all_layers: bool = False) -> str:
    """Human-readable report; layers of identical kind across decoder layers are folded into one line."""
    lines = [
        f"checkpoint   {s.path}",
        f"architecture {s.arch} ({s.num_layers} decoder layers), dtype {s.dtype}",
        "variants     " + ", ".join(f"{v} x{n}" for v, n in sorted(s.variants.items())),
        "",
        f"{'module':<40} {'shape [O x I]':>15} {'variant':>18} {'nominal':>8} {'bits/w':>7}  flags",
    ]
    if all_layers:
        rows = [(r.path, r, 1) for r in s.layers]
    else:
        groups: dict[tuple, list[LayerRow]] = {}
        for r in s.layers:
            folded = _EXPERT_NUM.sub(".experts.*.", _LAYER_NUM.sub(".layers.*.", r.path))
            key = (folded, r.out_features, r.in_features, r.variant, r.flags, round(r.bits_per_weight, 4))
            groups.setdefault(key, []).append(r)
        rows = [(k[0], g[0], len(g)) for k, g in groups.items()]
    for name, r, n in rows:
        count = f" x{n}" if n > 1 else ""
        lines.append(
            f"{name + count:<40} {f'{r.out_features} x {r.in_features}':>15} {r.variant:>18} "
            f"{r.nominal_bits:>8.3f} {r.bits_per_weight:>7.3f}  {r.flags}"
        )
    q_bytes = s.index_bytes + s.codebook_bytes + s.other_layer_bytes
    lines += [
        "",
        f"index bytes     {_mb(s.index_bytes)}",
        f"codebook bytes  {_mb(s.codebook_bytes)}",
        f"perm/norm/bias  {_mb(s.other_layer_bytes)}",
        f"dense bytes     {_mb(s.dense_bytes)} ({s.dense_params:,} params: embeddings, norms, lm_head, ...)",
        f"total           {_mb(s.total_bytes)} vs fp16 {_mb(s.fp16_bytes)} "
        f"({100 * s.total_bytes / max(s.fp16_bytes, 1):.1f}% of fp16)",
        f"quantized part  {8 * q_bytes / max(s.quantized_weights, 1):.3f} bits/weight over "
        f"{s.quantized_weights:,} weights",
    ]
    return "\n".join(lines)
