"""One VPTQ linear layer's configuration (the `LayerCfg` of microsoft/VPTQ) and the `vN-kA-B` variant name.

Every stage takes its numbers from here: the reader validates tensor shapes against the derived sizes,
the converter picks a kernel layout, the kernels size their loops, `inspect` reports bits per weight.
See docs/vptq-format.md sections 1-3 for the meaning of each field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from vptq_mlc.errors import CheckpointError

_VARIANT_RE = re.compile(r"^v(\d+)-k(\d+)-(\d+)$")


@dataclass(frozen=True)
class Variant:
    """The published variant name `v{v}-k{K}-{Kr}`: main vector length, main and residual codebook sizes."""

    vector_len: int
    num_centroids: int
    num_res_centroids: int  # 0 = no residual codebook

    @classmethod
    def parse(cls, name: str) -> Variant:
        m = _VARIANT_RE.match(name.strip().lower().removeprefix("vptq-"))
        if not m:
            raise CheckpointError(f"bad variant name {name!r}: expected vN-kA-B, e.g. v8-k65536-256")
        v, k, kr = (int(x) for x in m.groups())
        for what, n in (("K", k), ("residual K", kr)):
            if n and (n & (n - 1) or n > 65536):
                raise CheckpointError(
                    f"bad variant name {name!r}: {what}={n} must be a power of two <= 65536 (or 0 for no residual)"
                )
        if v < 1 or k < 2:
            raise CheckpointError(f"bad variant name {name!r}: need vector length >= 1 and K >= 2")
        return cls(v, k, kr)

    @property
    def name(self) -> str:
        return f"v{self.vector_len}-k{self.num_centroids}-{self.num_res_centroids}"

    @property
    def nominal_bits(self) -> float:
        """Index bits per weight, `(log2 K + log2 Kr) / v`, as in the VPTQ README."""
        rb = math.log2(self.num_res_centroids) if self.num_res_centroids > 0 else 0
        return (math.log2(self.num_centroids) + rb) / self.vector_len


def _pair(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise CheckpointError(f"layer config key {key!r} must be a two-element list [outlier, main], got {value!r}")


@dataclass(frozen=True)
class VPTQLayerConfig:
    """Configuration of one VPTQ-quantized `nn.Linear` (weight `[out_features, in_features]`)."""

    in_features: int
    out_features: int
    vector_len: int  # v (main)
    num_centroids: int  # K
    num_res_centroids: int  # Kr, 0 = none
    outlier_vector_len: int  # vo, -1 = no outliers
    num_outlier_centroids: int  # Ko, -1 = no outliers
    outlier_size: int  # osz: leading pre-permutation columns coded by the outlier codebook
    group_num: int  # G
    group_size: int  # S
    enable_norm: bool
    enable_perm: bool
    is_indice_packed: bool
    bias: bool

    # ---- (de)serialization in microsoft/VPTQ's key names ----
    @classmethod
    def from_json(
        cls, d: Mapping[str, Any], *, in_features: int | None = None, out_features: int | None = None, where: str = ""
    ) -> VPTQLayerConfig:
        """Parse a LayerCfg dict; `in/out_features` fill in what a shared_layer_config entry omits."""
        where = f" for {where}" if where else ""
        try:
            vo, v = _pair(d["vector_lens"], "vector_lens")
            ko, k = _pair(d["num_centroids"], "num_centroids")
            _, kr = _pair(d.get("num_res_centroids", [-1, -1]), "num_res_centroids")
            i_f = int(d.get("in_features", in_features if in_features is not None else -1))
            o_f = int(d.get("out_features", out_features if out_features is not None else -1))
            osz = int(d.get("outlier_size", 0))
            g = int(d.get("group_num", 1))
            bias = d.get("bias", False)
            cfg = cls(
                in_features=i_f,
                out_features=o_f,
                vector_len=v,
                num_centroids=k,
                num_res_centroids=max(kr, 0),
                outlier_vector_len=vo,
                num_outlier_centroids=ko,
                outlier_size=osz,
                group_num=g,
                group_size=int(d.get("group_size", (i_f - osz) // max(g, 1))),
                enable_norm=bool(d.get("enable_norm", False)),
                enable_perm=bool(d.get("enable_perm", False)),
                is_indice_packed=bool(d.get("is_indice_packed", True)),
                bias=bool(bias) if not isinstance(bias, (dict, list)) else True,
            )
        except KeyError as e:
            raise CheckpointError(f"layer config{where} lacks key {e.args[0]!r}; fix config.json") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"layer config{where} is malformed ({e}); fix config.json") from None
        cfg.check(where.removeprefix(" for "))
        return cfg

    def to_json(self) -> dict[str, Any]:
        """The LayerCfg dict exactly as microsoft/VPTQ writes it (lists are [outlier, main])."""
        return {
            "bias": self.bias,
            "enable_norm": self.enable_norm,
            "enable_perm": self.enable_perm,
            "group_num": self.group_num,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "indices_as_float": False,
            "is_indice_packed": self.is_indice_packed,
            "num_centroids": [self.num_outlier_centroids, self.num_centroids],
            "num_res_centroids": [-1, self.num_res_centroids if self.num_res_centroids > 0 else -1],
            "out_features": self.out_features,
            "outlier_size": self.outlier_size,
            "vector_lens": [self.outlier_vector_len, self.vector_len],
        }

    def check(self, where: str = "") -> None:
        """Raise a one-line CheckpointError if the numbers are inconsistent or unsupported."""
        at = f"layer {where}: " if where else ""

        def bad(msg: str) -> None:
            raise CheckpointError(f"{at}{msg}")

        if self.in_features <= 0 or self.out_features <= 0:
            bad(f"in_features/out_features must be positive, got {self.in_features}/{self.out_features}")
        if self.vector_len < 1:
            bad(f"vector length must be >= 1, got {self.vector_len}")
        for name, n in (("num_centroids", self.num_centroids), ("num_res_centroids", self.num_res_centroids)):
            if (n or name == "num_centroids") and (n < 2 or n > 65536 or n & (n - 1)):
                bad(f"{name}={n} unsupported: codebook sizes must be powers of two in [2, 65536]")
        if self.has_outliers:
            ko = self.num_outlier_centroids
            if ko < 2 or ko > 65536 or ko & (ko - 1):
                bad(f"outlier num_centroids={ko} unsupported: must be a power of two in [2, 65536]")
        elif self.outlier_size:
            bad(f"outlier_size={self.outlier_size} but outliers are disabled (vector_lens[0]/num_centroids[0])")
        if self.group_num < 1 or self.group_size < 1:
            bad(f"group_num/group_size must be >= 1, got {self.group_num}/{self.group_size}")
        if self.in_features != self.outlier_size + self.group_num * self.group_size:
            bad(
                f"in_features={self.in_features} != outlier_size + group_num*group_size = "
                f"{self.outlier_size} + {self.group_num}*{self.group_size}"
            )

    # ---- derived sizes (vptq-format.md notation) ----
    @property
    def has_outliers(self) -> bool:
        return self.outlier_vector_len > 1 and self.num_outlier_centroids > 0

    @property
    def has_residual(self) -> bool:
        return self.num_res_centroids > 0

    @property
    def num_vectors(self) -> int:
        """N: vector rows after padding the output dimension to a multiple of v."""
        return -(-self.out_features // self.vector_len)

    @property
    def num_outlier_vectors(self) -> int:
        return -(-self.out_features // self.outlier_vector_len) if self.has_outliers else 0

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.num_centroids))

    @property
    def res_bits(self) -> int:
        return int(math.log2(self.num_res_centroids)) if self.has_residual else 0

    @property
    def total_bits(self) -> int:
        return self.index_bits + self.res_bits

    @property
    def packed_words(self) -> int:
        """P: int32 words per packed row of S codes."""
        return -(-self.group_size * self.total_bits // 32)

    @property
    def variant(self) -> Variant:
        return Variant(self.vector_len, self.num_centroids, self.num_res_centroids)

    def stored_bits(self, float_bits: int = 16) -> int:
        """Bits this layer occupies in a packed checkpoint (codes + codebooks + norm/perm/bias)."""
        bits = self.group_num * self.num_vectors * self.packed_words * 32
        bits += float_bits * self.vector_len * self.group_num * (self.num_centroids + self.num_res_centroids)
        if self.has_outliers:
            bits += 16 * self.num_outlier_vectors * self.outlier_size
            bits += float_bits * self.outlier_vector_len * self.num_outlier_centroids
        if self.enable_norm:
            bits += 2 * float_bits * self.in_features
        if self.enable_perm:
            bits += 16 * self.in_features
        if self.bias:
            bits += float_bits * self.out_features
        return bits

    def bits_per_weight(self, float_bits: int = 16) -> float:
        return self.stored_bits(float_bits) / (self.in_features * self.out_features)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_variant(
        cls,
        variant: Variant | str,
        in_features: int,
        out_features: int,
        *,
        outlier_size: int = 0,
        outlier_vector_len: int = -1,
        num_outlier_centroids: int = -1,
        group_num: int = 1,
        enable_norm: bool = True,
        enable_perm: bool = True,
        is_indice_packed: bool = True,
        bias: bool = False,
    ) -> VPTQLayerConfig:
        """The config the published recipe gives a linear of this shape (perm + norm, one group)."""
        var = Variant.parse(variant) if isinstance(variant, str) else variant
        if (in_features - outlier_size) % group_num:
            raise CheckpointError(
                f"in_features - outlier_size = {in_features - outlier_size} is not divisible by group_num={group_num}"
            )
        cfg = cls(
            in_features=in_features,
            out_features=out_features,
            vector_len=var.vector_len,
            num_centroids=var.num_centroids,
            num_res_centroids=var.num_res_centroids,
            outlier_vector_len=outlier_vector_len if outlier_size else -1,
            num_outlier_centroids=num_outlier_centroids if outlier_size else -1,
            outlier_size=outlier_size,
            group_num=group_num,
            group_size=(in_features - outlier_size) // group_num,
            enable_norm=enable_norm,
            enable_perm=enable_perm,
            is_indice_packed=is_indice_packed,
            bias=bias,
        )
        cfg.check()
        return cfg
