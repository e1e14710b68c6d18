"""MLA's absorbed projections: `kv_b_proj` split into the per-head matrices TVM's latent (MLA) KV cache needs.

Why: the latent cache holds one vector per token (the normalised compressed KV, `kv_lora_rank` wide, and the roped
key part), not per-head K and V. Attention over it multiplies each head's query by that head's key up-projection
(`q_nope @ W_UK[h]`, kv_lora_rank wide) and each head's latent output by its value up-projection (`o @ W_UV[h]`), so
both must exist as dense per-head matrices. A VPTQ-coded `kv_b_proj` yields them only dequantized; `convert` writes
them for every deepseek_v3 layer (dense or VPTQ kv_b_proj alike), in the model dtype.
"""

from __future__ import annotations

import numpy as np

W_UK, W_UV = "w_uk", "w_uv"  # tensor names under `model.layers.<i>.self_attn.`
MLA_TENSOR_SUFFIXES = (f".self_attn.{W_UK}", f".self_attn.{W_UV}")


def absorbed_names(layer: int) -> tuple[str, str]:
    """The tensor-cache names of layer `layer`'s W_UK and W_UV."""
    prefix = f"model.layers.{layer}.self_attn"
    return f"{prefix}.{W_UK}", f"{prefix}.{W_UV}"


def absorbed_kv_b(weight: np.ndarray, heads: int, qk_nope: int, v_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(W_UK [heads, qk_nope, kv_lora], W_UV [heads, kv_lora, v_dim]) from kv_b_proj's weight
    [heads * (qk_nope + v_dim), kv_lora] (rows of head h: its qk_nope key rows, then its v_dim value rows, as
    transformers' `kv_b_proj(...).view(..., heads, qk_nope + v_dim)` reads them).

    k_nope[h] = W_UK[h] @ c and v[h] = c @ W_UV[h] for a latent c, so that
    q_nope[h] . k_nope[h] = (q_nope[h] @ W_UK[h]) . c."""
    rows, kv_lora = weight.shape
    if rows != heads * (qk_nope + v_dim):
        raise ValueError(f"kv_b_proj has {rows} rows, expected heads {heads} x (qk_nope {qk_nope} + v {v_dim})")
    per_head = weight.reshape(heads, qk_nope + v_dim, kv_lora)
    w_uk = np.ascontiguousarray(per_head[:, :qk_nope, :])
    w_uv = np.ascontiguousarray(per_head[:, qk_nope:, :].transpose(0, 2, 1))
    return w_uk, w_uv
