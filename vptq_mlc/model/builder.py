"""`build_model`: the module tree for one converted model, with VPTQLinear where the checkpoint is quantized."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from tvm.relax.frontend import nn
from tvm.target import Target

from vptq_mlc.artifact.expert_stack import expert_stacks
from vptq_mlc.checkpoint.arch import ARCHITECTURES
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import CheckpointError
from vptq_mlc.model.config import DecoderConfig
from vptq_mlc.model.vptq_linear import GatheredVPTQLinears, VPTQLinear
from vptq_mlc.tir_kernels.registry import KernelSelector, NormBiasKernels


def build_model(
    cfg: DecoderConfig,
    layers: Mapping[str, VPTQLayerConfig],
    dtype: str,
    target: Target,
    select_kernel: KernelSelector,
    static_decode_batches: tuple[int, ...] = (),
    select_norm_bias: NormBiasKernels | None = None,
    arch: str = "llama",
    logits_dtype: str | None = None,
    embedding_dtype: str | None = None,
    codebook_dtype: str | None = None,
    latent_kv_cache: bool = False,
) -> nn.Module:
    """The registry entry's module tree: linears listed in `layers` become VPTQLinear, the rest dense nn.Linear.
    `logits_dtype`: the logits matmul's output dtype (the target backend's choice; None: the model's dtype).
    `embedding_dtype` / `codebook_dtype`: the embedding table's / the VQ codebooks' stored dtype
    (ChatConfig.embedding_dtype / codebook_dtype; None: the model's dtype). `latent_kv_cache`: deepseek_v3 on TVM's
    MLA cache (GPU targets) instead of the decompressed MHA cache."""
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    module_name, _, class_name = ARCHITECTURES[arch].module_tree.partition(":")
    tree: Any = getattr(importlib.import_module(module_name), class_name)

    def make_linear(path: str, in_f: int, out_f: int, bias: bool) -> nn.Module:
        qcfg = layers.get(path)
        if qcfg is None:
            return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
        if (qcfg.in_features, qcfg.out_features) != (in_f, out_f):
            raise CheckpointError(
                f"layer {path}: quantized shape {qcfg.out_features}x{qcfg.in_features} does not match the "
                f"architecture's {out_f}x{in_f}"
            )
        if bias != qcfg.bias:
            raise CheckpointError(
                f"layer {path}: the architecture {'needs' if bias else 'has no'} bias but the VPTQ layer "
                f"{'has none' if bias else 'has one'}; reconvert the checkpoint"
            )
        return VPTQLinear(qcfg, dtype, select_kernel, select_norm_bias, codebook_dtype)

    stacks = expert_stacks(layers)

    def gathered(prefix: str) -> dict[str, nn.Module] | None:
        """Name -> GatheredVPTQLinears for the stacked routed experts under `prefix` (None: they do not stack)."""
        found = {path.rpartition(".")[2]: st for path, st in stacks.items() if path.rpartition(".")[0] == prefix}
        if not found:
            return None
        return {name: GatheredVPTQLinears(st.cfg, st.matrices, dtype, select_kernel, codebook_dtype)
                for name, st in found.items()}

    make_linear.gathered = gathered  # type: ignore[attr-defined]  # read by mixture-of-experts trees

    if latent_kv_cache and arch != "deepseek_v3":
        raise CheckpointError(f"the latent (MLA) KV cache is for deepseek_v3 models; {arch} has no MLA attention")
    options = {"latent_kv_cache": True} if latent_kv_cache else {}
    return tree(cfg, make_linear, dtype, target, static_decode_batches, logits_dtype=logits_dtype,
                embedding_dtype=embedding_dtype, **options)
