"""Which tensors a VPTQ layer stores, with their shapes and dtypes (vptq-format.md section 2).

One table shared by the reader's validator, the writer's pre-write check, `decode_codes` and the synthetic
generator, so they can never disagree about the format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig

# Short names of a quantized layer's tensors, in the order VQuantLinear's state_dict lists them.
SHORT_NAMES = (
    "centroids.weight",
    "res_centroids.weight",
    "outlier_centroids.weight",
    "indices",
    "res_indices",
    "outlier_indices",
    "perm",
    "weight_scale",
    "weight_bias",
    "bias",
)

FLOAT = "float"  # any of FLOAT_DTYPES, the same for all float tensors of a layer
FLOAT_DTYPES = ("float16", "bfloat16", "float32")

# safetensors dtype tag -> numpy-style name (bfloat16 has no numpy dtype; the reader widens it to float32)
ST_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]  # allowed stored dtypes; (FLOAT,) = the layer's float dtype

    def describe(self) -> str:
        return f"{'/'.join(self.dtypes)} {list(self.shape)}"


def expected_tensors(cfg: VPTQLayerConfig) -> dict[str, TensorSpec]:
    """Short name -> expected shape/dtype of every tensor this layer must store (and no others)."""
    G, N, S, v = cfg.group_num, cfg.num_vectors, cfg.group_size, cfg.vector_len
    out: dict[str, TensorSpec] = {"centroids.weight": TensorSpec((G, cfg.num_centroids * v), (FLOAT,))}
    if cfg.has_residual:
        out["res_centroids.weight"] = TensorSpec((G, cfg.num_res_centroids * v), (FLOAT,))
    if cfg.is_indice_packed:
        out["indices"] = TensorSpec((G, N, cfg.packed_words), ("int32",))
    else:
        out["indices"] = TensorSpec((G, N, S), ("int16",))
        if cfg.has_residual:
            out["res_indices"] = TensorSpec((G, N, S), ("int16",))
    if cfg.has_outliers:
        out["outlier_centroids.weight"] = TensorSpec((1, cfg.num_outlier_centroids * cfg.outlier_vector_len), (FLOAT,))
        out["outlier_indices"] = TensorSpec((1, cfg.num_outlier_vectors, cfg.outlier_size), ("int16",))
    if cfg.enable_perm:
        # the package stores int16 (uint16 bits) when packed and int64 otherwise; accept either.
        out["perm"] = TensorSpec((cfg.in_features,), ("int16", "int64") if cfg.is_indice_packed else ("int64", "int16"))
    if cfg.enable_norm:
        out["weight_scale"] = TensorSpec((cfg.in_features,), (FLOAT,))
        out["weight_bias"] = TensorSpec((cfg.in_features,), (FLOAT,))
    if cfg.bias:
        out["bias"] = TensorSpec((cfg.out_features,), (FLOAT,))
    return out


def np_dtype_name(a: np.ndarray) -> str:
    return np.dtype(a.dtype).name


def as_unsigned(a: np.ndarray) -> np.ndarray:
    """Signed integer storage of unsigned codes (int16 holding uint16 bits, int32 holding uint32) -> int64 values."""
    a = np.asarray(a)
    if a.dtype == np.int16:
        return a.view(np.uint16).astype(np.int64)
    if a.dtype == np.int32:
        return a.view(np.uint32).astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    raise TypeError(f"expected an integer array, got {a.dtype}")


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16/int16) -> float32 (exact: bf16 is the top half of an fp32)."""
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even like torch's `.to(torch.bfloat16)`."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(np.asarray(a, np.float32))
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded
